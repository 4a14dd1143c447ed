"""rayvid.core."""
