"""Stead: a clone-based continuity engine for Linux servers."""

__version__ = "0.1.0"
