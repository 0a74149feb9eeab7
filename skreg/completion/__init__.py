"""Low-rank matrix completion by robust alternating minimization."""

from skreg.completion._completer import LowRankCompleter

__all__ = ["LowRankCompleter"]
