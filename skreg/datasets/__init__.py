"""Generators of problems with planted solutions, and loaders of packaged data."""

from skreg.datasets._dictionary import make_orthogonal_sparse_data

__all__ = ["make_orthogonal_sparse_data"]
