"""Exact rescaling by powers of two, for data near the ends of the float range."""

import math

__all__ = ["largest_magnitude", "power_of_two_exponent", "times_power_of_two"]


def times_power_of_two(x, exponent):
    """``x * 2^exponent``, exact (barring subnormals), for a float, array or tensor.

    In two factors: ``2^exponent`` alone may lie beyond the float range where
    the product does not.
    """
    if abs(exponent) < 1000:
        return x * 2.0**exponent
    half = exponent // 2
    return x * 2.0**half * 2.0 ** (exponent - half)


def power_of_two_exponent(top):
    """The smallest integer ``e`` with ``|top| <= 2^e`` (``top`` a float), None
    for 0; an OverflowError for an infinite or NaN ``top``."""
    top = abs(float(top))
    if top == 0:
        return None
    if not math.isfinite(top):
        raise OverflowError(f"no power of two bounds {top}")
    return math.frexp(top)[1]


def largest_magnitude(x):
    """``max |x|`` of a tensor, in one pass without a temporary."""
    low, high = x.aminmax()
    return max(-float(low), float(high))
