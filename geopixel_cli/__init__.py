"""GIS command-line tool for GeoPixel: scenes of any size to georeferenced vector layers."""
