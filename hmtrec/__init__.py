"""hmtrec: hierarchical multi-task recommendation."""

__version__ = "0.1.0"
