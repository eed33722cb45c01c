"""The package's version, in a module of its own so modules can read it without
importing the package (whose lazy exports lead back to them)."""

__version__ = "0.1.0"
