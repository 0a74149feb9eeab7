"""Generators of problems with planted solutions, and loaders of packaged data."""

__all__ = []
