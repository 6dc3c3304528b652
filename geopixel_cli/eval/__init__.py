"""``geopixel eval``: RS-GCG and RRSIS metrics computed exactly as the reference code does."""
