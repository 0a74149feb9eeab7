"""Maximum-likelihood proportional-odds (cumulative logit) model."""

import numbers
import warnings

import torch
from sklearn.base import _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval

from skreg._device import to_numpy
from skreg.ordinal._base import (
    CumulativeLogitMixin,
    finite_fit,
    solver_tolerance,
)
from skreg.ordinal._presto import _StandardizedProblem, warn_if_separable
from skreg.ordinal._solver import fit_proportional_odds


class ProportionalOddsClassifier(CumulativeLogitMixin):
    """Proportional-odds ordinal regression by exact maximum likelihood.

    ``P(y <= k | x) = sigmoid(intercept_[k] + coef_ @ x)``: one weight vector
    shared by every threshold. This is the limit of :class:`PrestoClassifier`
    when the penalty on the differences grows without bound.

    Parameters
    ----------
    standardize : bool, default=True
        Solve on standardized features (better conditioned); the estimates are
        reported on the raw scale and do not depend on this choice.
    categories : array-like of shape (n_classes,), default=None
        The class labels in increasing order. By default, the category order of
        an ordered pandas Categorical ``y`` (the categories that occur in it),
        else the sorted unique labels of ``y``. Every category must occur in
        training.
    max_iter : int, default=100
        Maximum number of Newton steps.
    tol : float, default=1e-10
        Stop when the largest gradient entry of the mean negative
        log-likelihood is at most ``tol`` (floored at ``1e3`` machine epsilons
        of float64, in which the fit is solved whatever the data's float type;
        float32 data gives float32 ``coef_`` and probabilities).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where torch computes.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels in their order.
    coef_ : ndarray of shape (n_features,)
        The shared weight vector.
    intercept_ : ndarray of shape (n_classes - 1,)
        Increasing threshold intercepts.
    n_iter_ : int
        Newton steps taken.
    n_features_in_ : int
        Number of features seen in fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen in fit, when they are all strings.

    See Also
    --------
    PrestoClassifier : lets the weight vectors differ, shrunk towards this model.

    Notes
    -----
    The negative log-likelihood is convex (Pratt, 1981). Newton's method on the
    exact Hessian, assembled from each observation's ``2 x 2`` block in its two
    adjacent logits, with an Armijo line search that keeps the thresholds
    ordered, converges in a handful of steps. On (quasi-)separable data the
    estimate does not exist (the coefficients diverge while the gradient still
    falls below ``tol``); a ``ConvergenceWarning`` says so when some training
    sample is fitted with certainty and a Newton step still moves the fit.
    statsmodels' ``OrderedModel`` parameterizes ``P(y <= k) = F(t_k - x @ b)``,
    so ``coef_ = -b`` and ``intercept_ = t``; it matches with ``distr="logit"``
    and ``fit(method="bfgs")``.

    References
    ----------
    P. McCullagh, "Regression Models for Ordinal Data", JRSS B 42 (1980).

    Examples
    --------
    >>> from skreg.datasets import make_rare_ordinal
    >>> from skreg.ordinal import ProportionalOddsClassifier
    >>> X, y, _ = make_rare_ordinal(n_samples=500, random_state=0)
    >>> clf = ProportionalOddsClassifier(device="cpu").fit(X, y)
    >>> clf.coef_.shape, clf.intercept_.shape
    ((10,), (3,))
    >>> bool((clf.intercept_[1:] > clf.intercept_[:-1]).all())
    True
    """

    _parameter_constraints = {
        "standardize": ["boolean"],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        **CumulativeLogitMixin._shared_constraints,
    }

    def __init__(self, *, standardize=True, categories=None, max_iter=100,
                 tol=1e-10, device="auto"):
        self.standardize = standardize
        self.categories = categories
        self.max_iter = max_iter
        self.tol = tol
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
        self : ProportionalOddsClassifier
        """
        X, codes, weights, device = self._prepare_fit(X, y, sample_weight)
        problem = _StandardizedProblem(X, codes, weights, len(self.classes_),
                                       self.standardize, device)
        tol = solver_tolerance(self.tol)
        intercept, coef, result = fit_proportional_odds(
            problem.X, problem.y, problem.w, problem.n_classes,
            max_iter=self.max_iter, tol=tol)
        if not result.converged:
            warnings.warn(
                f"Newton did not reach tol={tol:.1e} in {result.n_iter} steps "
                f"(gradient {result.kkt_violation:.2e}); the data may be separable.",
                ConvergenceWarning,
                stacklevel=2,
            )
        psi = torch.zeros((problem.n_classes - 1, coef.shape[0]), dtype=coef.dtype,
                          device=coef.device)
        psi[0] = coef
        warn_if_separable(problem, intercept, psi, True,
                          "Use PrestoClassifier with alpha > 0 instead.")
        coef = to_numpy(coef) / problem.scale
        intercept = to_numpy(intercept) - coef @ problem.mean
        self.coef_, self.intercept_ = finite_fit(coef, intercept, X.dtype)
        self.n_iter_ = result.n_iter
        return self
