"""The package version, in a module of its own so any layer can read it without importing
the top-level package (which loads the Python API and the node)."""

__version__ = "0.1.0"
