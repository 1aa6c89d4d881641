"""The package version (read by pyproject.toml and by provenance without importing the package)."""
__version__ = "0.1.0"
