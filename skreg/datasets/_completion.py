"""Partially observed low-rank matrices with their ground truth."""

import numbers

import numpy as np
import scipy.sparse as sp
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params

__all__ = ["make_low_rank_matrix_completion"]


@validate_params(
    {
        "n_rows": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_cols": [Interval(numbers.Integral, 1, None, closed="left")],
        "rank": [Interval(numbers.Integral, 1, None, closed="left")],
        "density": [Interval(numbers.Real, 0, 1, closed="right")],
        "noise": [Interval(numbers.Real, 0, None, closed="left")],
        "sparse": ["boolean"],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_low_rank_matrix_completion(n_rows=100, n_cols=100, *, rank=5, density=0.3,
                                    noise=0.0, sparse=False, random_state=None):
    """A random rank-``rank`` matrix observed on a random subset of its entries.

    The truth is ``M = U @ V.T`` with ``U`` and ``V`` i.i.d. Gaussian with
    variance ``1 / sqrt(rank)``, so the entries of ``M`` have unit variance.
    Each entry is observed independently with probability ``density`` and
    recorded with Gaussian noise of standard deviation ``noise``.

    Parameters
    ----------
    n_rows, n_cols : int, default=100
        Shape ``(m, n)`` of the matrix.
    rank : int, default=5
        Rank of the truth.
    density : float in (0, 1], default=0.3
        Probability that an entry is observed.
    noise : float, default=0.0
        Standard deviation of the noise added to the observed entries.
    sparse : bool, default=False
        Return the observations as a ``scipy.sparse.csr_matrix`` whose stored
        entries are the observed ones (never forming the dense matrix: use it
        for large sizes) instead of a dense array with NaN at missing entries.
        Duplicate draws are merged, so the realized density is slightly below
        ``density`` when it is large.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (m, n) or csr_matrix
        The observations (NaN where missing in the dense case).
    U : ndarray of shape (m, rank)
    V : ndarray of shape (n, rank)
        The ground truth factors: ``M = U @ V.T``.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.datasets import make_low_rank_matrix_completion
    >>> X, U, V = make_low_rank_matrix_completion(50, 40, rank=3, density=0.4,
    ...                                           random_state=0)
    >>> X.shape, U.shape, V.shape
    ((50, 40), (50, 3), (40, 3))
    >>> observed = ~np.isnan(X)
    >>> bool(np.allclose(X[observed], (U @ V.T)[observed]))
    True
    """
    rng = check_random_state(random_state)
    scale = rank ** -0.25
    U = rng.standard_normal((n_rows, rank)) * scale
    V = rng.standard_normal((n_cols, rank)) * scale
    if not sparse:
        observed = rng.random_sample((n_rows, n_cols)) < density
        X = np.full((n_rows, n_cols), np.nan)
        rows, cols = np.nonzero(observed)
        X[rows, cols] = np.einsum("ij,ij->i", U[rows], V[cols])
        X[rows, cols] += noise * rng.standard_normal(rows.size)
        return X, U, V
    n_draws = rng.binomial(n_rows * n_cols, density)
    flat = np.unique(rng.randint(0, n_rows * n_cols, size=n_draws, dtype=np.int64))
    rows, cols = np.divmod(flat, n_cols)
    values = np.empty(flat.size)
    chunk = 1 << 20
    for start in range(0, flat.size, chunk):
        stop = start + chunk
        values[start:stop] = np.einsum("ij,ij->i", U[rows[start:stop]],
                                       V[cols[start:stop]])
    values += noise * rng.standard_normal(values.size)
    X = sp.csr_matrix((values, (rows, cols)), shape=(n_rows, n_cols))
    return X, U, V
