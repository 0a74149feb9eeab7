"""Simulated ordinal data with a rare top class (PRESTO's simulation study)."""

import numbers

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params


@validate_params(
    {
        "n_samples": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_features": [Interval(numbers.Integral, 1, None, closed="left")],
        "intercepts": ["array-like"],
        "differences": [StrOptions({"sparse", "dense"})],
        "sparsity": [Interval(numbers.Real, 0, 1, closed="both")],
        "max_tries": [Interval(numbers.Integral, 1, None, closed="left")],
        "return_coef": ["boolean"],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_rare_ordinal(n_samples=2500, n_features=10, *, intercepts=(0.0, 3.0, 5.0),
                      differences="sparse", sparsity=0.5, max_tries=100,
                      return_coef=False, random_state=None):
    """Ordinal data whose top class is rare, with non-parallel thresholds.

    Draws ``X ~ U[-1, 1]^p`` and ``K = len(intercepts) + 1`` classes from
    ``P(y <= k | x) = sigmoid(intercepts[k] + beta_k @ x)`` where
    ``beta_0 = 0.5 * Bernoulli(q)`` entrywise and each later ``beta_k`` adds a
    deviation to ``beta_{k-1}``: ``0.5 * Bernoulli(q) * Rademacher`` entrywise
    (``differences="sparse"``) or ``Uniform(-0.5, 0.5)`` (``"dense"``). Draws whose
    cumulative probabilities cross at a sampled point are redrawn.

    Parameters
    ----------
    n_samples : int, default=2500
        Number of rows.
    n_features : int, default=10
        Number of features ``p``.
    intercepts : array-like of shape (n_classes - 1,), default=(0, 3, 5)
        Increasing threshold intercepts; the larger the last one, the rarer the
        top class. The paper also uses ``(0, 3.5, 5.5)`` and ``(0, 4, 6)``.
    differences : {"sparse", "dense"}, default="sparse"
        How adjacent weight vectors differ.
    sparsity : float in [0, 1], default=0.5
        The Bernoulli probability ``q`` (share of non-zero entries).
    max_tries : int, default=100
        Redraws allowed before giving up on a non-crossing draw.
    return_coef : bool, default=False
        Also return the true weight vectors.
    random_state : int, RandomState instance or None, default=None
        Seed.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        Class indices ``0 .. K-1``; ``K-1`` is the rare class.
    proba : ndarray of shape (n_samples, K)
        True class probabilities of each row.
    coef : ndarray of shape (K - 1, n_features)
        The weight vectors ``beta_k``; only with ``return_coef=True``.

    Notes
    -----
    Section 4.1 of G. Faletto and J. Bien, "Predicting Rare Events by Shrinking
    Towards Proportional Odds", ICML 2023 (n = 2500, p = 10, K = 4).

    Examples
    --------
    >>> from skreg.datasets import make_rare_ordinal
    >>> X, y, proba = make_rare_ordinal(n_samples=100, random_state=0)
    >>> X.shape, proba.shape
    ((100, 10), (100, 4))
    """
    intercepts = np.asarray(intercepts, dtype=np.float64).ravel()
    if intercepts.size < 1 or np.any(np.diff(intercepts) <= 0):
        raise ValueError(
            "intercepts must be a non-empty, strictly increasing sequence, got "
            f"{intercepts!r}."
        )
    rng = check_random_state(random_state)
    n_thresholds = intercepts.size
    for _ in range(max_tries):
        X = rng.uniform(-1.0, 1.0, size=(n_samples, n_features))
        beta = np.empty((n_thresholds, n_features))
        beta[0] = 0.5 * rng.binomial(1, sparsity, size=n_features)
        for k in range(1, n_thresholds):
            if differences == "sparse":
                step = (0.5 * rng.binomial(1, sparsity, size=n_features)
                        * rng.choice([-1.0, 1.0], size=n_features))
            else:
                step = rng.uniform(-0.5, 0.5, size=n_features)
            beta[k] = beta[k - 1] + step
        eta = intercepts + X @ beta.T
        if np.all(np.diff(eta, axis=1) > 0):
            break
    else:
        raise ValueError(
            f"no draw without crossing cumulative probabilities in {max_tries} "
            "tries; use intercepts further apart or a smaller sparsity."
        )
    cumulative = 1.0 / (1.0 + np.exp(-eta))
    padded = np.hstack([np.zeros((n_samples, 1)), cumulative, np.ones((n_samples, 1))])
    proba = np.diff(padded, axis=1)
    u = rng.uniform(size=(n_samples, 1))
    y = (u > cumulative).sum(axis=1)
    if return_coef:
        return X, y, proba, beta
    return X, y, proba
