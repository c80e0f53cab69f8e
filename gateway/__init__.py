"""Image-generation gateway: one API in front of many text-to-image providers."""

__version__ = "0.1.0"
