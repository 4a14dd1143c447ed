"""rayvid.model."""
