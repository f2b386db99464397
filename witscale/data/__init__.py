"""Data: token classes, readers, templates, packing and the packed on-disk format."""
