"""Ordinal regression: PRESTO and the proportional-odds model."""

from skreg.ordinal._presto import PrestoClassifier, PrestoClassifierCV
from skreg.ordinal._proportional_odds import ProportionalOddsClassifier

__all__ = ["PrestoClassifier", "PrestoClassifierCV", "ProportionalOddsClassifier"]
