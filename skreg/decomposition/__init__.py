"""Orthogonal dictionary learning, batch and online, with a recovery metric."""

from ._metrics import DictionaryRecovery, dictionary_recovery
from ._orthogonal import OrthogonalDictionaryLearning

__all__ = ["DictionaryRecovery", "OrthogonalDictionaryLearning", "dictionary_recovery"]
