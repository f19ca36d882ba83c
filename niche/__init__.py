"""niche: a node for an image-generation subnet."""
__version__ = "0.1.0"
