"""rayvid.tune."""
