"""ordinal family of skreg (public names listed in __all__)."""

__all__ = []
