"""rayvid.data."""
