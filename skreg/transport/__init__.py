"""Sparsity-constrained optimal transport and the estimators built on it."""

from skreg.transport._estimators import (
    SparseOTDomainAdaptationClassifier,
    SparseOTTransport,
)
from skreg.transport._ot import SparseOTResult, sparsity_constrained_ot

__all__ = [
    "SparseOTDomainAdaptationClassifier",
    "SparseOTResult",
    "SparseOTTransport",
    "sparsity_constrained_ot",
]
