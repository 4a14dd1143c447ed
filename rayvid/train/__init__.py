"""rayvid.train."""
