"""Generators of problems with planted solutions, and loaders of packaged data."""

from skreg.datasets._completion import make_low_rank_matrix_completion
from skreg.datasets._dictionary import make_orthogonal_sparse_data
from skreg.datasets._noisy_labels import make_noisy_labels
from skreg.datasets._ordinal import make_rare_ordinal

__all__ = [
    "make_low_rank_matrix_completion",
    "make_noisy_labels",
    "make_orthogonal_sparse_data",
    "make_rare_ordinal",
]
