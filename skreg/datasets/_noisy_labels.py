"""Symmetric label noise with a known set of corrupted samples."""

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["make_noisy_labels"]


def make_noisy_labels(y, noise_rate=0.4, *, random_state=None):
    """Corrupt labels with symmetric noise: each label, with probability
    ``noise_rate``, is replaced by one of the other classes drawn uniformly.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        Clean labels (any type, at least two classes).
    noise_rate : float in [0, 1), default=0.4
        Probability that a label is corrupted.
    random_state : int, RandomState instance or None, default=None

    Returns
    -------
    y_noisy : ndarray of shape (n_samples,)
        Labels of the same type as ``y``.
    corrupted : ndarray of bool, shape (n_samples,)
        The planted truth: which labels were changed (``y_noisy != y`` exactly
        there).

    Notes
    -----
    This is the "symmetric" noise of the noisy-label literature (e.g. Liu et al.,
    NeurIPS 2020) in its variant where a corrupted label never keeps its class,
    so the realized noise rate is ``noise_rate`` in expectation.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.datasets import make_noisy_labels
    >>> y_noisy, corrupted = make_noisy_labels(np.arange(10) % 2, 0.5,
    ...                                        random_state=0)
    >>> bool(np.all((y_noisy != np.arange(10) % 2) == corrupted))
    True
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {y.shape}.")
    if not 0 <= noise_rate < 1:
        raise ValueError(f"noise_rate must be in [0, 1), got {noise_rate!r}.")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("y needs at least two classes to be corrupted.")
    rng = check_random_state(random_state)
    corrupted = rng.random_sample(len(y)) < noise_rate
    shift = rng.randint(1, len(classes), size=int(corrupted.sum()))
    codes = codes.copy()
    codes[corrupted] = (codes[corrupted] + shift) % len(classes)
    return classes[codes], corrupted
