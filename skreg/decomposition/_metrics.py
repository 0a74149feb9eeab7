"""How close a learned dictionary is to a planted one."""

import numbers
from typing import NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.utils._param_validation import Interval, validate_params
from sklearn.utils.validation import check_array


class DictionaryRecovery(NamedTuple):
    """Result of :func:`dictionary_recovery`.

    Parameters
    ----------
    recovery : float
        Fraction of true atoms matched with ``|cos| > threshold``.
    l4 : float
        ``||C||_4^4 / min(k_est, k_true)`` with ``C`` the matrix of cosines; 1
        exactly when every atom of the smaller set is a signed copy of one atom
        of the other.
    assignment : ndarray of shape (min(k_est, k_true), 2)
        Matched pairs ``(estimated index, true index)``.
    cosines : ndarray of shape (min(k_est, k_true),)
        ``|cos|`` of each matched pair.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.decomposition import dictionary_recovery
    >>> D = np.eye(3)
    >>> result = dictionary_recovery(-D[[2, 0, 1]], D)
    >>> result.recovery, result.l4
    (1.0, 1.0)
    >>> result.assignment.tolist()
    [[0, 2], [1, 0], [2, 1]]
    """

    recovery: float
    l4: float
    assignment: np.ndarray
    cosines: np.ndarray


@validate_params(
    {
        "D_est": ["array-like"],
        "D_true": ["array-like"],
        "threshold": [Interval(numbers.Real, 0, 1, closed="both")],
    },
    prefer_skip_nested_validation=True,
)
def dictionary_recovery(D_est, D_true, *, threshold=0.95):
    """Match learned atoms to true atoms up to sign and permutation.

    Parameters
    ----------
    D_est : array-like of shape (k_est, n_features)
        Learned atoms as rows (e.g. ``components_``).
    D_true : array-like of shape (k_true, n_features)
        Planted atoms as rows.
    threshold : float, default=0.95
        A true atom counts as recovered when its matched atom has
        ``|cos| > threshold``.

    Returns
    -------
    DictionaryRecovery
        ``(recovery, l4, assignment, cosines)``.

    Notes
    -----
    Rows are normalized, ``C = D_est D_true^T`` holds the cosines, and the
    matching maximizes ``sum |C_ij|`` over one-to-one pairs (Hungarian
    algorithm), so a single learned atom cannot be credited twice. The l4 figure
    is the error measure of Zhai et al. (2020) and of the online Frank-Wolfe
    paper (Xue and Lau), ``| ||A D_0||_4^4 / n - 1 |`` being its distance to 1.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.decomposition import dictionary_recovery
    >>> D = np.eye(3)
    >>> result = dictionary_recovery(-D[[2, 0, 1]], D)
    >>> result.recovery, result.l4
    (1.0, 1.0)
    """
    D_est = check_array(D_est, dtype=np.float64, input_name="D_est")
    D_true = check_array(D_true, dtype=np.float64, input_name="D_true")
    if D_est.shape[1] != D_true.shape[1]:
        raise ValueError(
            "D_est and D_true must have the same number of features (columns), got "
            f"{D_est.shape[1]} and {D_true.shape[1]}."
        )
    norms_est = np.linalg.norm(D_est, axis=1, keepdims=True)
    norms_true = np.linalg.norm(D_true, axis=1, keepdims=True)
    if np.any(norms_est == 0) or np.any(norms_true == 0):
        raise ValueError("Atoms (rows) of D_est and D_true must be non-zero.")
    C = np.abs((D_est / norms_est) @ (D_true / norms_true).T)
    rows, cols = linear_sum_assignment(C, maximize=True)
    cosines = C[rows, cols]
    recovery = float(np.sum(cosines > threshold) / D_true.shape[0])
    l4 = float(np.sum(C**4) / min(C.shape))
    return DictionaryRecovery(recovery, l4, np.column_stack([rows, cols]), cosines)
