"""Training: GeoPixelD / RRSIS-D data, the training forward, the loop, checkpoints and export."""
