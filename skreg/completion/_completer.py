"""LowRankCompleter: the scikit-learn shell around the alternating solver."""

import math
import numbers
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import (
    BaseEstimator,
    OneToOneFeatureMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from skreg._device import resolve_device, to_numpy, torch_generator
from skreg.completion._solver import (
    alternating_minimization,
    fold_in_rows,
    observed_entries,
)

__all__ = ["LowRankCompleter"]


def _is_nan(value):
    return isinstance(value, numbers.Real) and math.isnan(value)


def _check_indices(name, index, size, allow_negative):
    """1-d integer ``index`` with entries in ``[0, size)`` (or ``[-size, size)``)."""
    index = np.asarray(index)
    if index.ndim != 1 or not (index.size == 0
                               or np.issubdtype(index.dtype, np.integer)):
        raise TypeError(f"{name} must be a 1-d array of integers.")
    index = index.astype(np.int64, copy=False)
    low = -size if allow_negative else 0
    if index.size and (index.min() < low or index.max() >= size):
        raise ValueError(f"{name} must lie in [{low}, {size}), got values in "
                         f"[{index.min()}, {index.max()}].")
    return index


class LowRankCompleter(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Complete a partially observed matrix with a low-rank model.

    Fits ``X ~= U V^T + c 1^T + 1 b^T + mu`` on the observed entries of ``X`` by
    alternating ridge least squares, each half-step solved for all rows at once
    on the device, either exactly (``solver="altmin_exact"``) or approximately
    by a few steps of preconditioned conjugate gradients (``solver="altmin"``).
    ``transform`` fills the missing entries of any rows: rows get their factor
    by a ridge fold-in against ``components_``, so the completer works as an
    imputer inside a :class:`~sklearn.pipeline.Pipeline`.

    Parameters
    ----------
    rank : int, default=10
        Rank ``k`` of the model. Must not exceed ``min(n_samples, n_features)``
        of the matrix given to ``fit``.
    alpha : float, default=1e-3
        Ridge penalty on the factors (and offsets), in units of squared error
        summed over the observed entries. Raise it (e.g. to 1-20 for ratings)
        when rows or columns have few observations.
    max_iter : int, default=50
        Maximum number of sweeps (one sweep updates the column factors, then the
        row factors).
    tol : float, default=1e-5
        Stop when the training RMSE changes by less than ``tol`` times itself
        between sweeps, or falls to the rounding level of the data (100
        machine epsilons times the RMS of the observed values). Stopping at
        ``max_iter`` before that raises a
        :class:`~sklearn.exceptions.ConvergenceWarning`.
    solver : {"altmin", "altmin_exact"}, default="altmin"
        ``"altmin"``: each half-step is at least ``n_cg_steps`` steps of
        batched preconditioned CG warm-started at the previous factors,
        O(``|Omega|`` k) per step, and more (at most ``rank``, or ``rank + 1``
        with ``center``) while a step still lowers the half-step objective by
        more than 1% of its value. ``"altmin_exact"``: each half-step solves
        the ``k x k`` normal equations of every row,
        O(``|Omega|`` k^2 + (m + n) k^3).
    init : {"svd", "random"}, default="svd"
        ``"svd"``: top-``rank`` SVD of the rescaled observed matrix with
        clipping of heavy rows. ``"random"``: Gaussian factors.
    n_cg_steps : int, default=2
        Minimum number of CG steps per half-step for ``solver="altmin"``.
    center : bool, default=True
        Subtract the mean of the observed entries and fit a per-row and a
        per-column offset along with the factors (``c`` and ``b`` above). Set
        to False when the matrix is known to be exactly low-rank.
    missing_values : float, default=np.nan
        The placeholder of missing entries in dense input; not infinite. Sparse
        input ignores it: its stored entries are the observed ones (explicit
        zeros included; a position stored twice holds the sum, as in scipy),
        and stored entries equal to ``missing_values`` count as missing.
    random_state : int, RandomState instance or None, default=None
        Seeds the randomized SVD or the random start.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where torch computes.
    verbose : int, default=0
        When positive, show a progress bar of the sweeps with the training RMSE.

    Attributes
    ----------
    components_ : ndarray of shape (rank, n_features)
        Column factors ``V^T``.
    row_factors_ : ndarray of shape (n_samples, rank)
        Row factors ``U`` of the rows seen in ``fit``.
    row_offsets_ : ndarray of shape (n_samples,)
        Row offsets ``c`` of the rows seen in ``fit`` (zeros if not ``center``).
    mean_ : ndarray of shape (n_features,)
        Column offsets including the global mean, ``mu + b`` (zeros if not
        ``center``).
    n_iter_ : int
        Number of sweeps run.
    reconstruction_err_ : ndarray of shape (`n_iter_`,)
        Training RMSE on the observed entries after each sweep.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined only when ``X`` has feature names that are all strings.

    See Also
    --------
    sklearn.impute.IterativeImputer : Column-wise regression imputer.
    sklearn.impute.KNNImputer : Nearest-neighbour imputer.

    Notes
    -----
    The objective over the observed set ``Omega`` is

    .. math::

        \\frac12 \\sum_{(i,j)\\in\\Omega} (X_{ij} - u_i^\\top v_j - c_i - b_j - \\mu)^2
        + \\frac{\\alpha}{2}(\\|U\\|_F^2 + \\|V\\|_F^2 + \\|c\\|^2 + \\|b\\|^2).

    The algorithm follows Jain, Netrapalli and Sanghavi (2013) and the robust
    variant of Gu, Song, Yin and Zhang (2023, arXiv:2302.11068): spectral start
    from ``P_Omega(X) / p`` with row clipping, then alternating least squares
    whose half-steps need only be solved approximately. The paper uses
    sketch-and-precondition per row; here the preconditioner of row ``i`` is its
    expected normal matrix ``|Omega_i| W + alpha I`` (one ``k x k``
    eigendecomposition for all rows) and the steps are batched CG, continued
    past ``n_cg_steps`` while they still pay. Unlike the
    theory, no sample splitting is done (every sweep reuses all entries) and a
    ridge term keeps under-observed rows well posed. The last row update is
    exact, so ``transform`` on the training rows reproduces ``fit_transform``.

    Rules for degenerate input: a column with no observed entry gets a zero
    factor and offset, so it is filled with ``mu`` plus the row offset; a row
    with no observed entry gets a zero factor and offset, so it is filled with
    ``mean_``. Nothing is ever filled with NaN. Infinite values raise, and so
    do observed values whose sum of squares overflows the float type.

    References
    ----------
    P. Jain, P. Netrapalli, S. Sanghavi. Low-rank matrix completion using
    alternating minimization. STOC 2013.

    Y. Gu, Z. Song, J. Yin, L. Zhang. Low rank matrix completion via robust
    alternating minimization in nearly linear time. ICLR 2024.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.completion import LowRankCompleter
    >>> from skreg.datasets import make_low_rank_matrix_completion
    >>> X, U, V = make_low_rank_matrix_completion(60, 40, rank=2, density=0.5,
    ...                                           random_state=0)
    >>> completer = LowRankCompleter(rank=2, center=False, alpha=0.0, tol=0.0,
    ...                              max_iter=200, device="cpu", random_state=0)
    >>> X_filled = completer.fit_transform(X)
    >>> bool(np.abs(X_filled - U @ V.T).max() < 1e-10)
    True
    >>> completer.n_iter_ < 200  # an exact fit stops at the rounding level
    True
    """

    _parameter_constraints = {
        "rank": [Interval(numbers.Integral, 1, None, closed="left")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "solver": [StrOptions({"altmin", "altmin_exact"})],
        "init": [StrOptions({"svd", "random"})],
        "n_cg_steps": [Interval(numbers.Integral, 1, None, closed="left")],
        "center": ["boolean"],
        "missing_values": [numbers.Real],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(self, rank=10, *, alpha=1e-3, max_iter=50, tol=1e-5,
                 solver="altmin", init="svd", n_cg_steps=2, center=True,
                 missing_values=np.nan, random_state=None, device="auto",
                 verbose=0):
        self.rank = rank
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.solver = solver
        self.init = init
        self.n_cg_steps = n_cg_steps
        self.center = center
        self.missing_values = missing_values
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _validate(self, X, mask, reset):
        if math.isinf(self.missing_values):
            raise ValueError(
                f"missing_values={self.missing_values} is not supported: infinite "
                "values are rejected as input. Replace them by np.nan and use "
                "missing_values=np.nan."
            )
        nan_missing = _is_nan(self.missing_values)
        X = validate_data(
            self, X, reset=reset, accept_sparse=["csr", "csc", "coo"],
            dtype=[np.float64, np.float32],
            ensure_all_finite="allow-nan" if nan_missing else True,
        )
        if sp.issparse(X):
            if mask is not None:
                raise TypeError(
                    "mask is only supported with dense X; with sparse X the stored "
                    "entries are the observed ones."
                )
            # Duplicate stored entries are summed, as scipy reads them; on a
            # copy, so that the caller's matrix is left as it was.
            X = X.tocoo(copy=True)
            X.sum_duplicates()
            rows, cols, values = X.row, X.col, X.data
            keep = ~np.isnan(values) if nan_missing else values != self.missing_values
            rows, cols, values = rows[keep], cols[keep], values[keep]
        else:
            observed = ~np.isnan(X) if nan_missing else X != self.missing_values
            if mask is not None:
                mask = np.asarray(mask)
                if mask.shape != X.shape or mask.dtype != bool:
                    raise ValueError(
                        f"mask must be a boolean array of shape {X.shape} (True "
                        f"marks an observed entry), got dtype {mask.dtype} and "
                        f"shape {mask.shape}."
                    )
                observed &= mask
            rows, cols = np.nonzero(observed)
            values = X[rows, cols]
        return X, rows.astype(np.int64), cols.astype(np.int64), values

    def _tensors(self, rows, cols, values, device):
        return (torch.as_tensor(rows, device=device),
                torch.as_tensor(cols, device=device),
                torch.as_tensor(np.ascontiguousarray(values), device=device))

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, mask=None):
        """Fit the low-rank model on the observed entries of ``X``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Dense data with ``missing_values`` at the missing entries, or a
            sparse matrix whose stored entries are the observed ones.
        y : None
            Ignored.
        mask : array-like of bool of shape (n_samples, n_features), default=None
            For dense ``X`` only: True marks the entries to use; entries where it
            is False are treated as missing (e.g. held out for validation).

        Returns
        -------
        self : LowRankCompleter
            The fitted completer.
        """
        self._fit(X, mask)
        return self

    def _fit(self, X, mask):
        device = resolve_device(self.device)
        random_state = check_random_state(self.random_state)
        X, rows, cols, values = self._validate(X, mask, reset=True)
        m, n = X.shape
        if self.rank > min(m, n):
            raise ValueError(
                f"rank={self.rank} must not exceed min(n_samples, n_features) = "
                f"{min(m, n)} for X of shape {X.shape}."
            )
        if values.size == 0:
            raise ValueError("X has no observed entry: every entry is missing.")
        # the training error sums the squares of the observed values; with a
        # margin for the residuals of the first sweeps
        limit = 1e-2 * math.sqrt(np.finfo(X.dtype).max / values.size)
        peak = float(np.abs(values).max())
        if peak > limit:
            raise ValueError(
                f"The observed values of X reach {peak:.3g}: the sum of their "
                f"squares overflows {X.dtype}. Divide X by a constant (at most "
                f"{limit:.3g} in absolute value is supported for "
                f"{values.size} observed entries)."
            )
        rows_t, cols_t, values_t = self._tensors(rows, cols, values, device)
        mu = values_t.mean() if self.center else torch.zeros((), dtype=values_t.dtype,
                                                            device=device)
        entries = observed_entries(rows_t, cols_t, values_t - mu, (m, n))
        generator = torch_generator(random_state, device)
        progress, callback = self._progress()
        try:
            # int(): the constraint admits any Integral, and a bool rank
            # indexed the factors as a mask (True gave a size error, not rank 1)
            U, V, c, b, result = alternating_minimization(
                entries, int(self.rank), alpha=self.alpha, max_iter=self.max_iter,
                tol=self.tol, exact=self.solver == "altmin_exact",
                n_cg_steps=self.n_cg_steps, init=self.init, offsets=self.center,
                generator=generator, callback=callback,
            )
        finally:
            if progress is not None:
                progress.close()
        if not result.converged:
            warnings.warn(
                f"LowRankCompleter stopped after max_iter={self.max_iter} sweeps "
                f"with the training RMSE still changing by more than tol="
                f"{self.tol:g} times itself (last RMSE "
                f"{result.rmse_history[-1]:.3g}). Increase max_iter or tol"
                + ("." if self.center else "; for a matrix that is not centered, "
                   "center=True also helps."),
                ConvergenceWarning, stacklevel=4,
            )
        self.components_ = to_numpy(V.T).copy()
        self.row_factors_ = to_numpy(U)
        self.row_offsets_ = to_numpy(c)
        self.mean_ = to_numpy(b + mu)
        self.n_iter_ = result.n_iter
        self.reconstruction_err_ = np.asarray(result.rmse_history)
        return X, rows, cols, values

    def _progress(self):
        if not self.verbose:
            return None, None
        from tqdm.auto import tqdm

        progress = tqdm(total=self.max_iter, desc="LowRankCompleter", unit="sweep")

        def callback(sweep, rmse):
            progress.update(1)
            progress.set_postfix(rmse=f"{rmse:.4g}")

        return progress, callback

    def _fill(self, X, rows, cols, values, U, c):
        filled = U @ self.components_ + c[:, None] + self.mean_[None, :]
        filled = filled.astype(X.dtype, copy=False)
        filled[rows, cols] = values
        return filled

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, *, mask=None):
        """Fit, then return ``X`` with its missing entries completed.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : None
            Ignored.
        mask : array-like of bool of shape (n_samples, n_features), default=None
            As in :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_samples, n_features)
            Observed entries unchanged, the others predicted.
        """
        X, rows, cols, values = self._fit(X, mask)
        return self._fill(X, rows, cols, values, self.row_factors_, self.row_offsets_)

    def transform(self, X, *, mask=None):
        """Return ``X`` with its missing entries completed.

        Each row's factor (and offset) is its ridge least-squares fit to its
        observed entries against ``components_`` (a fold-in); for the rows seen
        in ``fit`` this is ``row_factors_``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        mask : array-like of bool of shape (n_samples, n_features), default=None
            As in :meth:`fit`.

        Returns
        -------
        ndarray of shape (n_samples, n_features)
            Dense, even for sparse ``X``: use :meth:`predict_entries` to
            query a few entries of a large matrix.
        """
        check_is_fitted(self)
        X, rows, cols, values = self._validate(X, mask, reset=False)
        U, c = self.fold_in(X.shape[0], rows, cols, values)
        return self._fill(X, rows, cols, values, U, c)

    def fold_in(self, n_rows, rows, cols, values):
        """Row factors and offsets of new rows from their observed entries.

        Parameters
        ----------
        n_rows : int
            Number of new rows.
        rows, cols : array-like of int of shape (n_observed,)
            Positions of the observed entries (row in ``range(n_rows)``, column
            in ``range(n_features_in_)``). A position given twice counts as two
            observations.
        values : array-like of shape (n_observed,)
            Their values, finite.

        Returns
        -------
        row_factors : ndarray of shape (n_rows, rank)
        row_offsets : ndarray of shape (n_rows,)
        """
        check_is_fitted(self)
        if not isinstance(n_rows, numbers.Integral) or isinstance(n_rows, bool):
            raise TypeError(f"n_rows must be an integer, got {n_rows!r}.")
        if n_rows < 0:
            raise ValueError(f"n_rows must be non-negative, got {n_rows}.")
        dtype = self.components_.dtype
        rows = _check_indices("rows", rows, n_rows, allow_negative=False)
        cols = _check_indices("cols", cols, self.components_.shape[1],
                              allow_negative=False)
        values = check_array(values, ensure_2d=False, dtype=dtype,
                             ensure_min_samples=0, input_name="values")
        if values.ndim != 1 or not rows.shape == cols.shape == values.shape:
            raise ValueError(
                f"rows, cols and values must be 1-d of the same length, got "
                f"shapes {rows.shape}, {cols.shape} and {values.shape}."
            )
        device = resolve_device(self.device, fallback=True)
        rows_t, cols_t, values_t = self._tensors(rows, cols, values, device)
        V = torch.as_tensor(self.components_.T.copy(), device=device)
        means = torch.as_tensor(self.mean_, device=device)
        U, c = fold_in_rows(rows_t, cols_t, values_t, n_rows, V, means, self.alpha,
                            offsets=self.center)
        return to_numpy(U), to_numpy(c)

    def predict_entries(self, rows, cols):
        """Predict the entries ``(rows[t], cols[t])`` of the fitted matrix.

        Parameters
        ----------
        rows : array-like of int of shape (n_queries,)
            Row indices among the rows seen in ``fit``.
        cols : array-like of int of shape (n_queries,)
            Column indices.

        Returns
        -------
        ndarray of shape (n_queries,)
        """
        check_is_fitted(self)
        m, n = self.row_factors_.shape[0], self.components_.shape[1]
        rows = _check_indices("rows", rows, m, allow_negative=True)
        cols = _check_indices("cols", cols, n, allow_negative=True)
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols must have the same length, got "
                             f"{rows.shape[0]} and {cols.shape[0]}.")
        return (np.einsum("ij,ji->i", self.row_factors_[rows],
                          self.components_[:, cols])
                + self.row_offsets_[rows] + self.mean_[cols])

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = _is_nan(self.missing_values)
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
