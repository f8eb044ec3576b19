"""The package version, in a module of its own so that the compiler can stamp it without importing
the package facade (bitcompile/__init__.py imports the compiler lazily)."""

__version__ = "0.1.0"
