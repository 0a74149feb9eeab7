"""PRESTO: cumulative logits whose thresholds share strength through fused L1."""

import numbers
import warnings

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import check_cv
from sklearn.utils._param_validation import Interval, StrOptions

from skreg._device import to_numpy, to_tensor
from skreg.ordinal._base import (
    SOLVER_DTYPE,
    CumulativeLogitMixin,
    finite_fit,
    solver_tolerance,
    standardization,
)
from skreg.ordinal._solver import (
    class_probabilities,
    cumulative_design,
    fit_presto,
    fit_proportional_odds,
    intercept_only_logits,
    presto_lambda_max,
    separation_suspected,
    stack_designs,
)

_PRESTO_CONSTRAINTS = {
    "l1_ratio": [Interval(numbers.Real, 0, 1, closed="both")],
    "penalize_first": ["boolean"],
    "standardize": ["boolean"],
    "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
    "tol": [Interval(numbers.Real, 0, None, closed="left")],
}


class _StandardizedProblem:
    """One training set moved to the device, standardized, ready for the solver.

    In float64 whatever the input's float type (see :data:`SOLVER_DTYPE`).
    """

    def __init__(self, X, codes, weights, n_classes, standardize, device,
                 penalize_first=True):
        weights = weights / weights.sum()
        X = np.asarray(X, SOLVER_DTYPE)
        self.mean, self.scale = standardization(X, weights, standardize)
        self.n_classes = n_classes
        self.penalize_first = penalize_first
        self.X = to_tensor((X - self.mean) / self.scale, device, dtype=SOLVER_DTYPE)
        self.y = torch.as_tensor(codes, dtype=torch.int64, device=device)
        self.w = to_tensor(weights, device, dtype=SOLVER_DTYPE)
        self._design = None

    @property
    def design(self):
        if self._design is None:
            self._design = cumulative_design(self.X, self.y, self.w, self.n_classes,
                                             self.penalize_first)
        return self._design

    def zero_penalty_start(self, max_iter, tol):
        """The fit with every penalized ``psi`` at zero (where the path starts)."""
        km1, p = self.n_classes - 1, self.X.shape[1]
        psi = torch.zeros((km1, p), dtype=self.X.dtype, device=self.X.device)
        if self.penalize_first:
            return intercept_only_logits(self.y, self.w, self.n_classes), psi
        intercept, coef, _ = fit_proportional_odds(self.X, self.y, self.w,
                                                   self.n_classes, max_iter=max_iter,
                                                   tol=tol)
        psi[0] = coef
        return intercept, psi

    def standardized_start(self, coef, intercept):
        """Raw-scale coefficients of an earlier fit, mapped to this problem's scale."""
        beta = to_tensor(coef * self.scale, self.X.device, dtype=self.X.dtype)
        psi = torch.diff(beta, dim=0, prepend=torch.zeros_like(beta[:1]))
        shifted = intercept + coef @ self.mean
        return to_tensor(shifted, self.X.device, dtype=self.X.dtype), psi

    def raw(self, intercept, psi):
        """Map standardized ``(intercept, psi)`` back to raw ``(coef, intercept)``."""
        coef = to_numpy(torch.cumsum(psi, 0)) / self.scale
        return coef, to_numpy(intercept) - coef @ self.mean

    def lambda_max(self, start, l1_ratio):
        intercept, psi = start
        return float(presto_lambda_max(self.design, intercept.unsqueeze(0),
                                       psi.unsqueeze(0), l1_ratio))

    def separation_suspected(self, intercept, psi, parallel):
        """:func:`separation_suspected` for the fit ``(intercept, psi)``."""
        eta = intercept + self.X @ torch.cumsum(psi, 0).T
        return separation_suspected(self.X, self.y, self.w, eta, parallel)

    def solve(self, lam, l1_ratio, start, max_iter, tol):
        intercept, psi = (None, None) if start is None else (
            start[0].unsqueeze(0), start[1].unsqueeze(0))
        intercept, psi, result = fit_presto(self.design, lam, l1_ratio,
                                            intercept=intercept, psi=psi,
                                            max_iter=max_iter, tol=tol)
        return intercept[0], psi[0], result


def warn_if_separable(problem, intercept, psi, parallel, remedy):
    """Warn when an unpenalized direction diverges on (quasi-)separable data."""
    if problem.separation_suspected(intercept, psi, parallel):
        warnings.warn(
            "Some training samples are fitted with class probabilities numerically "
            "0 or 1 and the likelihood still decreases along a direction of the "
            "coefficients: the classes look (quasi-)separable, so the maximum-"
            "likelihood estimate does not exist and the coefficients grow without "
            f"bound as tol shrinks. {remedy}",
            ConvergenceWarning,
            stacklevel=3,
        )


_PRESTO_REMEDY = "Use alpha > 0 with penalize_first=True."


def _unpenalized_directions(alpha, penalize_first):
    """Which directions the penalty leaves free (they can diverge), if any.

    ``"separate"`` (no penalty), ``"parallel"`` (the shared weight vector, when
    only the differences are penalized) or ``None``.
    """
    if alpha == 0:
        return "separate"
    return None if penalize_first else "parallel"


def _warn_not_converged(result, lam):
    warnings.warn(
        f"PRESTO did not converge at alpha={lam:.4g} in {result.n_iter} iterations "
        f"(KKT violation {result.kkt_violation:.2e}); increase max_iter or tol.",
        ConvergenceWarning,
        stacklevel=3,
    )


class PrestoClassifier(CumulativeLogitMixin):
    """Ordinal regression that shrinks adjacent thresholds towards proportional odds.

    Cumulative logit model with one weight vector per threshold,
    ``P(y <= k | x) = sigmoid(intercept_[k] + coef_[k] @ x)``, fitted by penalized
    maximum likelihood with an L1 (or elastic-net) penalty on the first weight
    vector and on the differences between adjacent ones (PRESTO). Rare classes
    at the end of the scale borrow strength from the common ones: their weight
    vector equals its neighbour's unless the data say otherwise.

    Parameters
    ----------
    alpha : float, default=0.01
        Penalty strength ``lambda``. ``0`` gives separate (non-parallel)
        cumulative logits; large values give the proportional-odds model
        (with ``penalize_first=False``) or the intercept-only model. With
        ``alpha=0`` or ``penalize_first=False`` some directions are unpenalized:
        on (quasi-)separable data their estimate does not exist, and a
        ``ConvergenceWarning`` says so.
    l1_ratio : float in [0, 1], default=1.0
        Share of the L1 part in the elastic-net penalty on the differences.
    penalize_first : bool, default=True
        Whether the first weight vector ``coef_[0]`` is penalized too, as in the
        authors' code. With ``False`` only the differences are, and the fit
        equals the proportional-odds maximum-likelihood fit for every
        ``alpha`` above a data-dependent threshold.
    standardize : bool, default=True
        Fit on features centred and scaled to unit (weighted population)
        standard deviation; ``coef_`` and ``intercept_`` are reported on the raw
        scale either way.
    categories : array-like of shape (n_classes,), default=None
        The class labels in increasing order. By default, the category order of
        an ordered pandas Categorical ``y`` (the categories that occur in it),
        else the sorted unique labels of ``y``. Every category must occur in
        training.
    max_iter : int, default=5000
        Maximum number of FISTA iterations.
    tol : float, default=1e-6
        Stop when the largest entry of the minimum-norm subgradient of the
        objective (its KKT violation) is at most ``tol``. Floored at ``1e3``
        times the machine epsilon of float64: the fit is solved in float64
        whatever the data's float type (float32 data gives float32
        ``coef_`` and probabilities; in float32 the violation stalls near
        ``1e3`` epsilons, and a cross-validated path on the wine data ran
        every penalty to ``max_iter``).
    warm_start : bool, default=False
        Start from the previous solution (mapped to the new data's scale)
        instead of the intercept-only fit.
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where torch computes.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels in their order.
    coef_ : ndarray of shape (n_classes - 1, n_features)
        Weight vector of each threshold, raw feature scale.
    intercept_ : ndarray of shape (n_classes - 1,)
        Threshold intercepts.
    n_iter_ : int
        FISTA iterations run.
    objective_ : float
        Penalized objective at the solution (standardized scale).
    n_features_in_ : int
        Number of features seen in fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen in fit, when they are all strings.

    See Also
    --------
    PrestoClassifierCV : chooses ``alpha`` by cross-validation.
    ProportionalOddsClassifier : the ``alpha -> inf`` limit with
        ``penalize_first=False`` (with the default, every slope shrinks to 0).

    Notes
    -----
    With ``psi_0 = beta_0`` and ``psi_k = beta_k - beta_{k-1}`` the problem is

    .. math::

        \\min -\\frac{1}{\\sum_i w_i}\\sum_i w_i \\log \\pi_{y_i}(x_i)
        + \\lambda \\sum_k m_k\\left(\\rho \\|\\psi_k\\|_1
        + \\frac{1 - \\rho}{2}\\|\\psi_k\\|_2^2\\right),

    with ``pi_c = sigmoid(eta_c) - sigmoid(eta_{c-1})``, ``m_0 = penalize_first``,
    ``m_k = 1`` otherwise, ``rho = l1_ratio``. It is convex; FISTA with
    backtracking and restarts solves it, rejecting steps where an observation's
    fitted curves cross at its own class. At prediction, crossed cumulative
    probabilities are sorted (monotone rearrangement), see
    :meth:`count_crossings`. Binary ``y`` gives (L1-penalized) logistic
    regression for ``P(y = classes_[0])``.

    References
    ----------
    G. Faletto and J. Bien, "Predicting Rare Events by Shrinking Towards
    Proportional Odds", ICML 2023.

    Examples
    --------
    >>> from skreg.datasets import make_rare_ordinal
    >>> from skreg.ordinal import PrestoClassifier
    >>> X, y, _ = make_rare_ordinal(n_samples=500, random_state=0)
    >>> clf = PrestoClassifier(alpha=0.005, device="cpu").fit(X, y)
    >>> clf.coef_.shape
    (3, 10)
    >>> clf.predict_proba(X[:2]).sum(axis=1).round(6)
    array([1., 1.])
    """

    _parameter_constraints = {
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        **_PRESTO_CONSTRAINTS,
        "warm_start": ["boolean"],
        **CumulativeLogitMixin._shared_constraints,
    }

    def __init__(self, alpha=0.01, *, l1_ratio=1.0, penalize_first=True,
                 standardize=True, categories=None, max_iter=5000, tol=1e-6,
                 warm_start=False, device="auto"):
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.penalize_first = penalize_first
        self.standardize = standardize
        self.categories = categories
        self.max_iter = max_iter
        self.tol = tol
        self.warm_start = warm_start
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (finite).
        y : array-like of shape (n_samples,)
            Ordered class labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights; a weight of zero removes the sample.

        Returns
        -------
        self : PrestoClassifier
        """
        previous = None
        if self.warm_start and hasattr(self, "coef_"):
            previous = (self.coef_, self.intercept_, self.classes_,
                        self.n_features_in_)
        X, codes, weights, device = self._prepare_fit(X, y, sample_weight)
        problem = _StandardizedProblem(X, codes, weights, len(self.classes_),
                                       self.standardize, device, self.penalize_first)
        start = None
        if (previous is not None and previous[3] == X.shape[1]
                and np.array_equal(previous[2], self.classes_)):
            start = problem.standardized_start(previous[0], previous[1])
        tol = solver_tolerance(self.tol)
        intercept, psi, result = problem.solve(self.alpha, self.l1_ratio, start,
                                               self.max_iter, tol)
        if not result.converged:
            _warn_not_converged(result, self.alpha)
        free = _unpenalized_directions(self.alpha, self.penalize_first)
        if free is not None:
            warn_if_separable(problem, intercept, psi, free == "parallel",
                              _PRESTO_REMEDY)
        coef, intercept = problem.raw(intercept, psi)
        self.coef_, self.intercept_ = finite_fit(coef, intercept, X.dtype, self.alpha)
        self.n_iter_ = result.n_iter
        self.objective_ = result.objective
        return self


def _fold_loss(proba, codes, weights, scoring):
    """Weighted mean multiclass Brier score or log-loss (lower is better)."""
    weights = weights / weights.sum()
    if scoring == "log_loss":
        picked = proba[np.arange(len(codes)), codes]
        return float(-(weights * np.log(np.clip(picked, 1e-15, None))).sum())
    onehot = np.zeros_like(proba)
    onehot[np.arange(len(codes)), codes] = 1.0
    return float(weights @ np.square(proba - onehot).sum(1))


class PrestoClassifierCV(CumulativeLogitMixin):
    """PRESTO with the penalty chosen by cross-validation along a path.

    Fits :class:`PrestoClassifier` on a decreasing grid of penalties (each fit
    warm-started from the previous one), scores each on held-out folds with a
    proper scoring rule, and refits on all the data at the best penalty.

    Parameters
    ----------
    alphas : int or array-like, default=20
        Number of penalties on a log grid from ``lambda_max`` (every penalized
        coefficient zero) down to ``alpha_min_ratio * lambda_max``, or the
        penalties themselves.
    alpha_min_ratio : float, default=0.01
        Smallest penalty of the automatic grid, relative to ``lambda_max``.
    l1_ratio : float in [0, 1], default=1.0
        Share of the L1 part of the penalty.
    penalize_first : bool, default=True
        Whether the first weight vector is penalized too (the authors' choice).
    scoring : {"brier", "log_loss"}, default="brier"
        Proper scoring rule minimized over the folds: the multiclass Brier score
        (as the authors do) or the log-loss.
    cv : int, cross-validation generator or iterable, default=5
        Folds, as in :func:`sklearn.model_selection.check_cv`; an integer gives
        stratified folds so every training fold sees every class.
    standardize : bool, default=True
        Standardize features internally (per fold).
    categories : array-like of shape (n_classes,), default=None
        The class labels in increasing order. By default, the category order of
        an ordered pandas Categorical ``y`` (the categories that occur in it),
        else the sorted unique labels of ``y``. Every category must occur in
        training.
    max_iter : int, default=5000
        Maximum FISTA iterations per penalty.
    tol : float, default=1e-6
        KKT tolerance of each fit (solved in float64, as in
        :class:`PrestoClassifier`).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where torch computes.

    Attributes
    ----------
    alphas_ : ndarray of shape (n_alphas,)
        The penalties tried, decreasing.
    alpha_ : float
        The chosen penalty: lowest mean held-out loss, the largest penalty on ties.
    best_index_ : int
        Index of ``alpha_`` in ``alphas_``.
    cv_results_ : dict of ndarrays
        ``"alphas"``, ``"mean_test_loss"``, ``"std_test_loss"`` and
        ``"split{i}_test_loss"`` (lower is better).
    classes_, coef_, intercept_, n_iter_ :
        As in :class:`PrestoClassifier`, for the full-data fit at ``alpha_``
        (``n_iter_`` sums the iterations of the path down to ``alpha_``, all
        folds and the full data being solved as one batch).

    Notes
    -----
    ``lambda_max`` is the largest absolute gradient entry of the penalized
    coefficients at the fit where they are all zero, divided by ``l1_ratio``
    (by ``max(l1_ratio, 1e-3)``). The authors' code uses 20 penalties, a ratio of
    0.01, 5 unstratified folds and the Brier score; stratified folds are used here
    because a fold without a rare class leaves its threshold unidentified.

    Examples
    --------
    >>> from skreg.datasets import make_rare_ordinal
    >>> from skreg.ordinal import PrestoClassifierCV
    >>> X, y, _ = make_rare_ordinal(n_samples=400, intercepts=(0, 2, 3.5),
    ...                             random_state=0)
    >>> clf = PrestoClassifierCV(alphas=5, cv=3, device="cpu").fit(X, y)
    >>> clf.alphas_.shape
    (5,)
    >>> bool(clf.alpha_ in clf.alphas_)
    True
    """

    _parameter_constraints = {
        "alphas": [Interval(numbers.Integral, 1, None, closed="left"), "array-like"],
        "alpha_min_ratio": [Interval(numbers.Real, 0, 1, closed="neither")],
        "scoring": [StrOptions({"brier", "log_loss"})],
        "cv": ["cv_object"],
        **_PRESTO_CONSTRAINTS,
        **CumulativeLogitMixin._shared_constraints,
    }

    def __init__(self, *, alphas=20, alpha_min_ratio=0.01, l1_ratio=1.0,
                 penalize_first=True, scoring="brier", cv=5, standardize=True,
                 categories=None, max_iter=5000, tol=1e-6, device="auto"):
        self.alphas = alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.l1_ratio = l1_ratio
        self.penalize_first = penalize_first
        self.scoring = scoring
        self.cv = cv
        self.standardize = standardize
        self.categories = categories
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None):
        """Fit the path, cross-validate it, and refit at the best penalty.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (finite).
        y : array-like of shape (n_samples,)
            Ordered class labels.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights (used in the fits and in the fold scores); a
            weight of zero removes the sample.

        Returns
        -------
        self : PrestoClassifierCV
        """
        X, codes, weights, device = self._prepare_fit(X, y, sample_weight)
        n_classes = len(self.classes_)
        tol = solver_tolerance(self.tol)
        full = _StandardizedProblem(X, codes, weights, n_classes, self.standardize,
                                    device, self.penalize_first)
        if isinstance(self.alphas, numbers.Integral):
            start = full.zero_penalty_start(self.max_iter, tol)
            lam_max = max(full.lambda_max(start, self.l1_ratio), 1e-12)
            alphas = np.geomspace(lam_max, lam_max * self.alpha_min_ratio,
                                  self.alphas)
        else:
            alphas = np.sort(np.asarray(self.alphas, dtype=np.float64).ravel())[::-1]
            if alphas.size == 0 or np.any(alphas < 0) or not np.all(
                    np.isfinite(alphas)):
                raise ValueError(
                    "alphas must be a positive integer or a non-empty array of "
                    f"finite non-negative penalties, got {self.alphas!r}."
                )
        cv = check_cv(self.cv, codes, classifier=True)
        problems, tests = [], []
        for fold, (train, test) in enumerate(cv.split(X, codes)):
            missing = np.setdiff1d(np.arange(n_classes),
                                   codes[train][weights[train] > 0])
            if missing.size:
                raise ValueError(
                    f"cross-validation fold {fold} has no training sample of class "
                    f"{self.classes_[missing].tolist()}; use fewer folds (cv)."
                )
            if not np.any(weights[test] > 0):
                raise ValueError(
                    f"cross-validation fold {fold} has no test sample with positive "
                    "sample_weight, so its loss is undefined; use fewer folds (cv)."
                )
            problem = _StandardizedProblem(X[train], codes[train], weights[train],
                                           n_classes, self.standardize, device,
                                           self.penalize_first)
            X_test = to_tensor((X[test].astype(SOLVER_DTYPE) - problem.mean)
                               / problem.scale, device,
                               dtype=problem.X.dtype)
            problems.append(problem)
            tests.append((X_test, test))
        # the folds and the full data share the penalty path, so they are solved
        # as one batch: one set of tensor operations per step for all of them
        problems.append(full)
        design = stack_designs([problem.design for problem in problems])
        starts = [problem.zero_penalty_start(self.max_iter, tol)
                  for problem in problems]
        start = (torch.stack([s[0] for s in starts]),
                 torch.stack([s[1] for s in starts]))
        losses, path, n_iter = [], [], []
        for lam in alphas:
            intercept, psi, result = fit_presto(design, lam, self.l1_ratio,
                                                intercept=start[0], psi=start[1],
                                                max_iter=self.max_iter, tol=tol)
            if not result.converged:
                _warn_not_converged(result, lam)
            start = (intercept, psi)
            path.append((intercept[-1], psi[-1]))
            n_iter.append(result.n_iter)
            fold_losses = []
            for b, (X_test, test) in enumerate(tests):
                eta = intercept[b] + X_test @ torch.cumsum(psi[b], 0).T
                proba = to_numpy(class_probabilities(eta))
                fold_losses.append(_fold_loss(proba, codes[test], weights[test],
                                              self.scoring))
            losses.append(fold_losses)
        losses = np.asarray(losses).T
        mean = losses.mean(0)
        finite = np.isfinite(mean)
        if not finite.any():
            raise ValueError(
                "every penalty in alphas gave a non-finite held-out loss "
                f"(alphas={alphas.tolist()}); check the scale of X and of "
                "sample_weight."
            )
        lowest = mean[finite].min()
        # the largest penalty among the (numerically) tied best, as the authors do
        best = int(np.flatnonzero(finite & (mean <= lowest + 1e-12 * abs(lowest)))[0])
        self.alphas_ = alphas
        self.best_index_ = best
        self.alpha_ = float(alphas[best])
        self.cv_results_ = {"alphas": alphas, "mean_test_loss": mean,
                            "std_test_loss": losses.std(0)}
        for fold, fold_losses in enumerate(losses):
            self.cv_results_[f"split{fold}_test_loss"] = fold_losses
        free = _unpenalized_directions(self.alpha_, self.penalize_first)
        if free is not None:
            warn_if_separable(full, *path[best], free == "parallel", _PRESTO_REMEDY)
        coef, intercept = full.raw(*path[best])
        self.coef_, self.intercept_ = finite_fit(coef, intercept, X.dtype, self.alpha_)
        self.n_iter_ = int(sum(n_iter[: best + 1]))
        return self
