"""The package version (the floor holds it: file headers record it)."""
__version__ = "0.1.0"
