"""rayvid.release."""
