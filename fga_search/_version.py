"""The package's version: its own module so that any module can read it without importing the package."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
