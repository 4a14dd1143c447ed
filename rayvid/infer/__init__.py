"""rayvid.infer."""
