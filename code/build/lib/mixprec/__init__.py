"""mixprec: mixed-precision training, one concept per module."""

__version__ = "0.1.0"
