"""Estimators built on sparsity-constrained optimal transport."""

import math
import numbers

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    MetaEstimatorMixin,
    OneToOneFeatureMixin,
    TransformerMixin,
    _fit_context,
    clone,
)
from sklearn.linear_model import LogisticRegression
from sklearn.utils import get_tags
from sklearn.utils._available_if import available_if
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _get_feature_names,
    check_array,
    check_is_fitted,
    has_fit_parameter,
    validate_data,
)

from skreg._device import resolve_device, to_numpy, to_tensor
from skreg.transport._ot import sparsity_constrained_ot
from skreg.utils._scaling import power_of_two_exponent, times_power_of_two

__all__ = ["SparseOTDomainAdaptationClassifier", "SparseOTTransport"]

_METRICS = {"sqeuclidean", "euclidean", "cityblock"}


def _cost_matrix(X, Y, metric):
    if metric == "sqeuclidean":
        return torch.cdist(X, Y).square()
    if metric == "euclidean":
        return torch.cdist(X, Y)
    return torch.cdist(X, Y, p=1.0)


def _masses(weight, X, name):
    if weight is None:
        return np.full(X.shape[0], 1.0 / X.shape[0])
    weight = check_array(weight, ensure_2d=False, dtype=np.float64,
                         input_name=name)
    if weight.shape != (X.shape[0],):
        raise ValueError(
            f"{name} must have shape ({X.shape[0]},), got {weight.shape}.")
    if (weight < 0).any() or weight.sum() <= 0:
        raise ValueError(
            f"{name} must be nonnegative and not all zero (a positive sum).")
    # Relative to the largest first: the sum of weights near 1e308 overflows.
    # The total is summed over the positive weights alone: zeros among them
    # change the rounding of a sum, and a sample of weight zero is as if
    # absent, to the last bit.
    weight = weight / weight.max()
    return weight / weight[weight > 0].sum()


def _to_unit(T):
    exponent = power_of_two_exponent(T.abs().amax()) or 0
    return times_power_of_two(T, -exponent), exponent


def _unit_pair(X, Y, held=None):
    """``X`` and ``Y`` about their joint mean, divided by one power of two to
    entries of at most 1, and its exponent.

    ``held`` (a boolean mask over the rows of ``X`` then ``Y``) takes the
    mean and the scale from those rows alone (the others follow them), so
    that rows outside it change nothing in the rows inside.

    Distances between them are ``2^exponent`` times the originals: squared
    distances of data beyond 1e154 no longer overflow, nor those below 1e-162
    underflow to zero (an arbitrary plan), and ``torch.cdist``'s matrix-product
    formula no longer cancels far from the origin (clouds 1e8 away from it got
    squared distances wrong by 10, and another plan). Each step is exact but
    the subtraction of the mean, which is computed at unit scale so that it
    cannot overflow.
    """
    def chosen(T):
        return T if held is None else T[held]

    both = torch.cat([X, Y])
    exponent = _to_unit(chosen(both))[1]
    both = times_power_of_two(both, -exponent)
    both = both - chosen(both).mean(dim=0)
    shift = _to_unit(chosen(both))[1]
    both = times_power_of_two(both, -shift)
    return both[:len(X)], both[len(X):], exponent + shift


def _in_cost_units(values, unit, exponent, dtype, name):
    """``values * unit * 2^exponent`` in ``dtype``, or a ValueError where that
    overflows (the solver's own infinities pass)."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        scaled = np.ldexp(values * unit, exponent).astype(dtype)
    if (np.isinf(scaled) & np.isfinite(values)).any():
        raise ValueError(
            f"{name} overflows {np.dtype(dtype)}: the costs between X and "
            f"X_target reach about 1e{round(exponent * math.log10(2))}. Divide X "
            "and X_target by a constant (or use metric='euclidean' instead of "
            "'sqeuclidean')."
        )
    return scaled


def _nearest(X, reference):
    X, reference, _ = _unit_pair(X, reference)
    return torch.cdist(X, reference).argmin(dim=1)


class SparseOTTransport(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Map source samples onto a target domain with a sparse transport plan.

    ``fit`` solves :func:`~skreg.transport.sparsity_constrained_ot` between the
    source samples ``X`` and the target samples ``X_target``; ``transform`` maps
    each source sample to the barycentre of the target samples it sends mass
    to (at most ``max_nz`` per target, so the plan stays interpretable).

    Parameters
    ----------
    max_nz : int, default=2
        Largest number of source samples feeding each target sample. Clipped
        to the number of source samples, and raised to
        ``ceil(n_source / n_target)`` (samples of weight zero not counted)
        where it is below: with fewer, no plan reaches every source sample.
        ``max_nz_`` is the value used.
    gamma : float, default=1.0
        Weight of the quadratic regularization, relative to the cost scale:
        the solver gets ``gamma * scale`` with ``scale`` the median (or max,
        see ``cost_normalization``) of the cost matrix between the samples
        of nonzero weight.
    metric : {"sqeuclidean", "euclidean", "cityblock"}, default="sqeuclidean"
        Ground cost between samples.
    cost_normalization : {"median", "max"} or None, default="median"
        How ``gamma`` is scaled; ``None`` uses ``gamma`` as is.
    formulation : {"semi_dual", "dual"}, default="semi_dual"
        Which dual the solver maximizes.
    max_iter : int, default=1000
        L-BFGS iteration budget.
    tol : float, default=1e-9
        Target marginal L1 error.
    repair : bool or "full", default=True
        Re-solve on the chosen supports when the dual read-out misses the
        marginals; ``"full"`` also tries an exact OT plan's support beyond
        ``1e7`` cost entries (see :func:`~skreg.transport.sparsity_constrained_ot`).
    device : str or torch.device, default="auto"
        Where the solver runs.

    Attributes
    ----------
    plan_ : ndarray of shape (n_source, n_target)
        The transport plan.
    max_nz_ : int
        The largest number of nonzeros per column the plan was allowed (see
        ``max_nz``).
    source_ : ndarray of shape (n_source, n_features)
        The training source samples.
    target_ : ndarray of shape (n_target, n_features)
        The target samples (the source itself when no ``X_target`` was given).
    transported_source_ : ndarray of shape (n_source, n_features)
        Barycentric images of the source samples in the target domain.
    transported_target_ : ndarray of shape (n_target, n_features)
        Barycentric images of the target samples in the source domain.
    alpha_, beta_ : ndarrays of shape (n_source,) and (n_target,)
        Dual potentials.
    transport_cost_ : float
        ``<P, C>`` in the (unnormalized) ground cost.
    duality_gap_ : float
        Primal minus dual objective of the normalized problem.
    marginal_error_ : float
        L1 error of the plan's marginals.
    n_iter_ : int
        Solver iterations.
    n_features_in_ : int
        Number of features seen in ``fit``.

    Notes
    -----
    Barycentric projection: :math:`T(x_i) = \\sum_j P_{ij} y_j / \\sum_j P_{ij}`.
    A new sample ``x`` is moved by the displacement of its nearest training
    source sample, :math:`x + T(x_{i^*}) - x_{i^*}` (the out-of-sample rule of
    Ferradans et al. 2014, also used by POT), so ``transform`` on the training
    samples equals ``transported_source_``. A training sample that the plan
    gives no mass (weight zero) has no barycentre and moves by the same rule,
    from its nearest sample with mass. Without ``X_target`` the target is
    the source itself: the plan is then a sparse self-transport that smooths
    the data, close to the identity for small ``gamma``.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.transport import SparseOTTransport
    >>> rng = np.random.RandomState(0)
    >>> Xs, Xt = rng.randn(20, 2), rng.randn(25, 2) + 3.0
    >>> ot = SparseOTTransport(max_nz=2, device="cpu").fit(Xs, X_target=Xt)
    >>> bool(abs(ot.transform(Xs).mean(axis=0) - Xt.mean(axis=0)).max() < 1e-6)
    True
    """

    _parameter_constraints = {
        "max_nz": [Interval(numbers.Integral, 1, None, closed="left")],
        "gamma": [Interval(numbers.Real, 0, None, closed="neither")],
        "metric": [StrOptions(_METRICS)],
        "cost_normalization": [StrOptions({"median", "max"}), None],
        "formulation": [StrOptions({"semi_dual", "dual"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "repair": ["boolean", StrOptions({"full"})],
        "device": [str, torch.device],
    }

    def __init__(self, max_nz=2, gamma=1.0, *, metric="sqeuclidean",
                 cost_normalization="median", formulation="semi_dual",
                 max_iter=1000, tol=1e-9, repair=True, device="auto"):
        self.max_nz = max_nz
        self.gamma = gamma
        self.metric = metric
        self.cost_normalization = cost_normalization
        self.formulation = formulation
        self.max_iter = max_iter
        self.tol = tol
        self.repair = repair
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, X_target=None, sample_weight=None,
            target_weight=None):
        """Learn the transport plan from ``X`` to ``X_target``.

        Parameters
        ----------
        X : array-like of shape (n_source, n_features)
            Source samples.
        y : None
            Ignored.
        X_target : array-like of shape (n_target, n_features), default=None
            Target samples; the source itself when None.
        sample_weight : array-like of shape (n_source,), default=None
            Source masses (uniform by default; normalized to sum to one).
        target_weight : array-like of shape (n_target,), default=None
            Target masses (uniform by default).

        Returns
        -------
        self : object
        """
        device = resolve_device(self.device)
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        if X_target is None:
            Xt = X
        else:
            names = getattr(self, "feature_names_in_", None)
            target_names = _get_feature_names(X_target)
            if names is not None and target_names is not None and not (
                    np.array_equal(names, target_names)):
                raise ValueError(
                    "X_target must have the feature names of X, in the same "
                    f"order: got {list(target_names)}, expected {list(names)}."
                )
            Xt = check_array(X_target, dtype=X.dtype, input_name="X_target")
            if Xt.shape[1] != X.shape[1]:
                raise ValueError(
                    f"X_target has {Xt.shape[1]} features but X has {X.shape[1]}."
                )
        a = _masses(sample_weight, X, "sample_weight")
        b = _masses(target_weight, Xt, "target_weight")
        # Each source sample with mass needs a nonzero in some column, and
        # there are max_nz per target sample with mass.
        sources, targets = int(np.count_nonzero(a)), int(np.count_nonzero(b))
        self.max_nz_ = min(max(self.max_nz, -(-sources // targets)), X.shape[0])
        # The cost at unit scale, C * 2^exponent in X's units. A sample of
        # weight zero is as if absent, to the last bit: the scale and the
        # costs between the samples with mass are computed without it (the
        # solver then drops it), since where max_nz binds a difference in
        # rounding alone can change the plan.
        rows, cols = a > 0, b > 0
        Xs_t, Xt_t = to_tensor(X, device), to_tensor(Xt, device)
        everything = bool(rows.all() and cols.all())
        held = None if everything else torch.as_tensor(
            np.concatenate([rows, cols]), device=Xs_t.device)
        Xs_t, Xt_t, exponent = _unit_pair(Xs_t, Xt_t, held)
        C = _cost_matrix(Xs_t, Xt_t, self.metric)
        if not everything:
            rows_t, cols_t = (torch.as_tensor(np.flatnonzero(m), device=C.device)
                              for m in (rows, cols))
            C[rows_t.unsqueeze(1), cols_t] = _cost_matrix(
                Xs_t[rows_t], Xt_t[cols_t], self.metric)
        if self.metric == "sqeuclidean":
            exponent *= 2
        scale, gamma = 1.0, self.gamma
        if self.cost_normalization is None:
            # gamma is in X's cost units: (C, gamma) and (t C, t gamma) have
            # the same plan.
            with np.errstate(over="ignore"):
                gamma = float(np.ldexp(float(gamma), -exponent))
            # A subnormal gamma overflows in the solver.
            if not np.finfo(np.float64).tiny <= gamma < math.inf:
                raise ValueError(
                    f"gamma={self.gamma} is beyond the float range relative to "
                    "the costs between X and X_target (about "
                    f"1e{round(exponent * math.log10(2))}), which "
                    "cost_normalization=None leaves unscaled. Use "
                    "cost_normalization='median'."
                )
        else:
            reduce = torch.median if self.cost_normalization == "median" else (
                torch.max)
            # Over the samples with mass: a sample of weight zero is as if
            # absent.
            used = C[torch.as_tensor(rows, device=C.device)][
                :, torch.as_tensor(cols, device=C.device)]
            scale = float(reduce(used))
            if not np.isfinite(scale) or scale <= 0:
                # All samples coincide: every plan costs zero, any scale works.
                scale = 1.0
        result = sparsity_constrained_ot(
            a, b, C / scale, self.max_nz_, gamma,
            formulation=self.formulation, max_iter=self.max_iter, tol=self.tol,
            repair=self.repair, device=device)
        plan = result.plan
        self.plan_ = to_numpy(plan).astype(X.dtype, copy=False)
        self.source_ = X
        self.target_ = Xt
        self.transported_source_ = self._images(X, Xt, self.plan_)
        self.transported_target_ = self._images(Xt, X, self.plan_.T)
        alpha, beta = to_numpy(result.alpha), to_numpy(result.beta)
        self.alpha_ = _in_cost_units(alpha, scale, exponent, alpha.dtype, "alpha_")
        self.beta_ = _in_cost_units(beta, scale, exponent, beta.dtype, "beta_")
        self.transport_cost_ = float(_in_cost_units(
            float(result.cost), scale, exponent, np.float64, "transport_cost_"))
        self.duality_gap_ = float(result.duality_gap)
        self.marginal_error_ = float(result.marginal_error)
        self.n_iter_ = int(result.n_iter)
        return self

    def _images(self, X, Y, plan):
        """Barycentric images in ``Y`` of the rows of ``X`` under ``plan``.

        A row without mass (weight zero, or a plan that misses it) has no
        barycentre: it moves as a new sample would, by the displacement of
        its nearest row with mass.
        """
        mass = plan.sum(axis=1)
        held = mass > 0
        images = np.array(X, copy=True)
        images[held] = (plan[held] @ Y) / mass[held, None]
        if not held.all():
            images[~held] = self._move(X[~held], X[held], images[held])
        return images.astype(X.dtype, copy=False)

    def _move(self, X, reference, images):
        device = resolve_device(self.device, fallback=True)
        X_t = to_tensor(X, device)
        ref_t = to_tensor(reference, device, dtype=X_t.dtype)
        nearest = to_numpy(_nearest(X_t, ref_t))
        return (X + images[nearest] - reference[nearest]).astype(X.dtype,
                                                                  copy=False)

    def _moved(self, X, reference, images, plan):
        # Only rows with mass have an image of their own to lend.
        held = plan.sum(axis=1) > 0
        return self._move(X, reference[held], images[held])

    def transform(self, X):
        """Map source-domain samples to the target domain.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._moved(X, self.source_, self.transported_source_,
                           self.plan_)

    def inverse_transform(self, X):
        """Map target-domain samples back to the source domain.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._moved(X, self.target_, self.transported_target_,
                           self.plan_.T)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def _estimator_has(name):
    def check(self):
        base = getattr(self, "estimator_", None)
        if base is None:
            base = LogisticRegression() if self.estimator is None else self.estimator
        return hasattr(base, name)

    return check


class SparseOTDomainAdaptationClassifier(MetaEstimatorMixin, ClassifierMixin,
                                         BaseEstimator):
    """Train any classifier on source samples transported to the target domain.

    ``fit(X, y, X_target=...)`` learns a :class:`SparseOTTransport` from the
    labelled source samples ``X`` to the unlabelled target samples, maps the
    source samples into the target domain and fits ``estimator`` on them with
    the source labels. ``predict`` then takes target-domain samples.

    Parameters
    ----------
    estimator : classifier, default=None
        The classifier trained on the transported samples;
        ``LogisticRegression()`` when None. Its parameters are tunable as
        ``estimator__<name>``.
    max_nz : int, default=2
        Largest number of source samples per target sample.
    gamma : float, default=1.0
        Relative regularization weight (see :class:`SparseOTTransport`).
    metric : {"sqeuclidean", "euclidean", "cityblock"}, default="sqeuclidean"
    cost_normalization : {"median", "max"} or None, default="median"
    formulation : {"semi_dual", "dual"}, default="semi_dual"
    max_iter : int, default=1000
    tol : float, default=1e-9
    repair : bool or "full", default=True
    device : str or torch.device, default="auto"
        These nine are passed to the :class:`SparseOTTransport`, whose
        documentation describes them.

    Attributes
    ----------
    transport_ : SparseOTTransport
        The fitted transport.
    estimator_ : classifier
        The fitted classifier.
    classes_ : ndarray of shape (n_classes,)
    n_iter_ : int
        Iterations of the transport solver.
    n_features_in_ : int

    Notes
    -----
    This is the "transport then train" scheme of Courty et al., "Optimal
    transport for domain adaptation" (TPAMI 2017), with the sparse plan of Liu
    et al. (ICLR 2023): each target sample borrows at most ``max_nz`` source
    samples, so the transported cloud keeps sharp class boundaries. Without
    ``X_target`` the target is the source itself.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.transport import SparseOTDomainAdaptationClassifier
    >>> rng = np.random.RandomState(0)
    >>> X = np.r_[rng.randn(20, 2), rng.randn(20, 2) + 4]
    >>> y = np.r_[np.zeros(20), np.ones(20)]
    >>> clf = SparseOTDomainAdaptationClassifier(device="cpu")
    >>> clf.fit(X, y, X_target=X + 10.0).score(X + 10.0, y)
    1.0
    """

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "predict"]), None],
        "max_nz": [Interval(numbers.Integral, 1, None, closed="left")],
        "gamma": [Interval(numbers.Real, 0, None, closed="neither")],
        "metric": [StrOptions(_METRICS)],
        "cost_normalization": [StrOptions({"median", "max"}), None],
        "formulation": [StrOptions({"semi_dual", "dual"})],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="neither")],
        "repair": ["boolean", StrOptions({"full"})],
        "device": [str, torch.device],
    }

    def __init__(self, estimator=None, *, max_nz=2, gamma=1.0,
                 metric="sqeuclidean", cost_normalization="median",
                 formulation="semi_dual", max_iter=1000, tol=1e-9, repair=True,
                 device="auto"):
        self.estimator = estimator
        self.max_nz = max_nz
        self.gamma = gamma
        self.metric = metric
        self.cost_normalization = cost_normalization
        self.formulation = formulation
        self.max_iter = max_iter
        self.tol = tol
        self.repair = repair
        self.device = device

    def _delegate(self, method, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return getattr(self.estimator_, method)(X)

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y, *, X_target=None, sample_weight=None):
        """Fit the transport, then the classifier on the transported source.

        Parameters
        ----------
        X : array-like of shape (n_source, n_features)
            Labelled source samples.
        y : array-like of shape (n_source,)
            Source labels.
        X_target : array-like of shape (n_target, n_features), default=None
            Unlabelled target samples; the source itself when None.
        sample_weight : array-like of shape (n_source,), default=None
            Source masses, also passed to the classifier when its ``fit``
            has a ``sample_weight`` parameter.

        Returns
        -------
        self : object
        """
        resolve_device(self.device)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        self.transport_ = SparseOTTransport(
            max_nz=self.max_nz, gamma=self.gamma, metric=self.metric,
            cost_normalization=self.cost_normalization,
            formulation=self.formulation, max_iter=self.max_iter, tol=self.tol,
            repair=self.repair, device=self.device,
        ).fit(X, X_target=X_target, sample_weight=sample_weight)
        base = LogisticRegression() if self.estimator is None else self.estimator
        self.n_iter_ = self.transport_.n_iter_
        self.estimator_ = clone(base)
        # The weights are the source masses in any case; the classifier gets
        # them too where its fit takes them.
        fit_params = {} if sample_weight is None or not has_fit_parameter(
            base, "sample_weight") else {"sample_weight": sample_weight}
        self.estimator_.fit(self.transport_.transported_source_, y, **fit_params)
        return self

    def predict(self, X):
        """Predict labels of target-domain samples.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        return self._delegate("predict", X)

    @available_if(_estimator_has("decision_function"))
    def decision_function(self, X):
        """Decision scores of target-domain samples (when ``estimator`` has
        ``decision_function``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
        """
        return self._delegate("decision_function", X)

    @available_if(_estimator_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities of target-domain samples (when ``estimator``
        has ``predict_proba``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        return self._delegate("predict_proba", X)

    @available_if(_estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """Log class probabilities of target-domain samples (when
        ``estimator`` has ``predict_log_proba``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        return self._delegate("predict_log_proba", X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        base = LogisticRegression() if self.estimator is None else self.estimator
        tags.input_tags.sparse = False
        tags.classifier_tags.multi_class = get_tags(base).classifier_tags is None or (
            get_tags(base).classifier_tags.multi_class)
        return tags
