"""Exact rescaling by powers of two, for data near the ends of the float range."""

import math

__all__ = ["power_of_two_exponent", "times_power_of_two"]


def times_power_of_two(x, exponent):
    """``x * 2^exponent``, exact (barring subnormals), for a float, array or tensor.

    In two factors: ``2^exponent`` alone may lie beyond the float range where
    the product does not.
    """
    half = exponent // 2
    return x * 2.0**half * 2.0 ** (exponent - half)


def power_of_two_exponent(top):
    """The smallest integer ``e`` with ``|top| <= 2^e`` (``top`` a float), or
    None for 0."""
    top = abs(float(top))
    if top == 0:
        return None
    return math.frexp(top)[1]
