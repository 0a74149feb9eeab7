"""Planted orthogonal dictionaries with Bernoulli-Gaussian codes."""

import numbers

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params


@validate_params(
    {
        "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_features": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "sparsity": [Interval(numbers.Real, 0, 1, closed="right")],
        "noise": [Interval(numbers.Real, 0, None, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_orthogonal_sparse_data(n_samples=1000, n_features=64, *, n_components=None,
                                sparsity=0.1, noise=0.0, random_state=None):
    """Samples ``Y = X D + E`` from a planted orthogonal dictionary ``D``.

    Parameters
    ----------
    n_samples : int, default=1000
        Number of samples (rows of ``Y``).
    n_features : int, default=64
        Dimension of each sample.
    n_components : int, default=None
        Number of atoms, at most ``n_features``; ``None`` means ``n_features``
        (a complete orthogonal basis).
    sparsity : float in (0, 1], default=0.1
        Probability ``theta`` that a code entry is non-zero.
    noise : float, default=0.0
        Standard deviation of the Gaussian noise ``E`` added to every entry.
    random_state : int, RandomState instance or None, default=None
        Seed of the draw.

    Returns
    -------
    Y : ndarray of shape (n_samples, n_features)
        The samples.
    dictionary : ndarray of shape (n_components, n_features)
        The planted atoms as orthonormal rows, Haar-distributed.
    codes : ndarray of shape (n_samples, n_components)
        Bernoulli(theta) times standard Gaussian entries.

    Notes
    -----
    This is the generative model of complete dictionary learning analyses
    (Spielman, Wang, Wright 2012; Zhai et al. 2020, arXiv:1906.02435): with
    ``A = D``, ``||A D^T||_4^4 / n = 1`` exactly, and any other orthogonal ``A``
    scores below 1. The codes have zero mean, so the samples need no centering.

    Examples
    --------
    >>> from skreg.datasets import make_orthogonal_sparse_data
    >>> Y, D, X = make_orthogonal_sparse_data(200, 8, sparsity=0.2, random_state=0)
    >>> Y.shape, D.shape, X.shape
    ((200, 8), (8, 8), (200, 8))
    >>> bool(abs(D @ D.T - np.eye(8)).max() < 1e-12)
    True
    """
    if n_components is None:
        n_components = n_features
    if n_components > n_features:
        raise ValueError(
            f"n_components must be at most n_features={n_features} for orthonormal "
            f"atoms, got n_components={n_components}."
        )
    rng = check_random_state(random_state)
    Q, R = np.linalg.qr(rng.standard_normal((n_features, n_components)))
    signs = np.sign(np.diag(R))
    signs[signs == 0] = 1.0
    dictionary = (Q * signs).T
    support = rng.uniform(size=(n_samples, n_components)) < sparsity
    codes = support * rng.standard_normal((n_samples, n_components))
    Y = codes @ dictionary
    if noise > 0:
        Y = Y + noise * rng.standard_normal(Y.shape)
    return Y, dictionary, codes
