"""Orthogonal dictionary learning: batch (MSP, Procrustes) and online Frank-Wolfe."""

import math
import numbers

import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from .._device import (
    resolve_device,
    to_numpy,
    to_tensor,
    torch_dtype,
    torch_generator,
)
from ..utils._scaling import (
    largest_magnitude,
    power_of_two_exponent,
    times_power_of_two,
)
from ._solver import (
    frank_wolfe,
    frank_wolfe_step,
    hard_threshold,
    lp_gradient,
    lp_objective,
    msp,
    procrustes,
    random_orthogonal,
    soft_threshold,
    unit_rows,
)

_DEFAULT_MAX_ITER = {"msp": 100, "procrustes": 100, "frank_wolfe": 1}


def _mean(Y):
    # Where the sum of the rows could overflow (entries near the float limit),
    # relative to a power of two above the largest entry (exact).
    exponent = power_of_two_exponent(largest_magnitude(Y))
    limit = power_of_two_exponent(torch.finfo(Y.dtype).max) - 1
    if exponent is None or exponent + math.ceil(math.log2(len(Y))) < limit:
        return Y.mean(dim=0)
    return times_power_of_two(times_power_of_two(Y, -exponent).mean(dim=0), exponent)


def _at_unit_scale(Y, mean):
    """``Y - mean`` at unit scale and the scale's exponent (see ``unit_rows``)."""
    try:
        return unit_rows(Y - mean, inplace=True)
    except OverflowError:
        raise ValueError(
            "X minus mean_ overflows the float range. Divide X by a constant: "
            "the dictionary does not change."
        ) from None


def _in_data_units(values, exponent, degree):
    """Objective values computed at unit scale, in X's units (float64)."""
    values = to_numpy(values).astype(np.float64)
    if exponent is None:
        return values
    # 2^(exponent * degree), exact for an integer degree; beyond +-2200 the
    # result is 0 or inf anyway.
    shift = exponent * degree
    whole = int(np.clip(np.floor(shift), -2200, 2200))
    with np.errstate(over="ignore"):
        values = np.ldexp(values * 2.0 ** (shift - np.floor(shift)), whole)
    if not np.isfinite(values).all():
        raise ValueError(
            "The objective of X overflows float64: X's rows reach a norm of "
            f"about 1e{round(exponent * math.log10(2))}, and the objective grows "
            f"as its power {degree}. "
            "Divide X by a constant: the dictionary does not change."
        )
    return values


def _finite(out, what):
    if not np.isfinite(out).all():
        raise ValueError(
            f"The {what} of this X overflow {out.dtype}'s range. Divide X by a "
            "constant (and the codes or samples by the same one)."
        )
    return out


class OrthogonalDictionaryLearning(
    ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator
):
    """Dictionary learning with orthonormal atoms, batch or online.

    Finds ``A`` with orthonormal rows (``A A^T = I``) such that the samples are
    sparse combinations of its rows, ``Y ~= X A`` with ``X`` sparse. Because the
    atoms are orthonormal the codes have a closed form: thresholded projections
    ``X = T(Y A^T)``.

    Parameters
    ----------
    n_components : int, default=None
        Number of atoms, at most ``n_features``. ``None`` means ``n_features``
        (a complete basis, the orthogonal group); fewer atoms live on the Stiefel
        manifold and use the same polar step.
    algorithm : {"msp", "procrustes", "frank_wolfe"}, default="msp"
        How :meth:`fit` learns the dictionary:

        - ``"msp"``: l_p maximization by matching, stretching and projection,
          ``A <- Polar((Y A^T)^(p-1) ^T Y)`` on the whole data.
        - ``"procrustes"``: alternate hard-thresholded codes ``H_alpha(Y A^T)`` and
          the orthogonal Procrustes update ``A <- Polar(X^T Y)``.
        - ``"frank_wolfe"``: passes of the online Frank-Wolfe rule (the one
          :meth:`partial_fit` uses) over shuffled mini-batches.
    power : float, default=4
        Exponent ``p > 2`` of the l_p objective ``sum ||A y||_p^p`` that ``"msp"``,
        ``"frank_wolfe"`` and :meth:`partial_fit` maximize. The online paper uses 3;
        the MSP paper 4.
    alpha : float, default=1.0
        Hard threshold of the codes inside ``"procrustes"`` (unused otherwise). In
        the units of the data: scale the data or this value together.
    transform_algorithm : {"hard", "soft", "none"}, default="hard"
        Codes returned by :meth:`transform`: hard thresholding of the projections
        (exact l0-penalized codes), soft thresholding (exact lasso codes), or the
        projections themselves.
    transform_alpha : float, default=0.1
        Threshold used by :meth:`transform`.
    center : bool, default=False
        Subtract the mean of the training data before learning and coding (and
        add it back in :meth:`inverse_transform`). The l_p objectives assume
        zero-mean codes; leave it off for data that are already centered.
    max_iter : int, default=None
        Iterations for ``"msp"`` and ``"procrustes"`` (``None``: 100), passes over
        the data for ``"frank_wolfe"`` (``None``: 1).
    tol : float, default=1e-6
        Stop when the relative change of the objective (per iteration, or per
        pass for ``"frank_wolfe"``) falls below ``tol``.
    batch_size : int, default=256
        Samples per Frank-Wolfe step in ``fit(algorithm="frank_wolfe")`` and in
        :meth:`partial_fit`, which cuts each chunk it receives into such batches.
    random_state : int, RandomState instance or None, default=None
        Seeds the random orthogonal start and the order of the Frank-Wolfe batches.
        Both are drawn on the CPU whatever ``device``, so a seed gives the same
        start on every device (the fits then differ by rounding only).
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        Where torch computes. Fitted attributes are NumPy arrays either way.
    verbose : bool or int, default=False
        Log the objective at each iteration (logger ``"skreg.decomposition"``).

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The atoms, orthonormal rows.
    mean_ : ndarray of shape (n_features,)
        Mean subtracted before coding (zeros when ``center=False``).
    n_iter_ : int
        Iterations (or passes, for ``"frank_wolfe"``) run by the last :meth:`fit`.
    n_steps_ : int
        Frank-Wolfe steps taken so far, counting every :meth:`partial_fit` since
        the last :meth:`fit`. ``fit`` with ``"frank_wolfe"`` counts its steps;
        ``"msp"`` and ``"procrustes"`` count the steps their ``n_iter_`` passes
        would take in batches of ``batch_size``, and also store the gradient
        average at the fitted dictionary, so that :meth:`partial_fit` continues
        from the fit with small steps instead of restarting.
    objective_ : ndarray
        History of the objective: per iteration for ``"msp"`` (mean l_p value,
        increasing) and ``"procrustes"`` (penalized squared residual per sample,
        decreasing), per pass for ``"frank_wolfe"``, and one value per
        Frank-Wolfe step appended by each :meth:`partial_fit` (the batch's mean
        l_p value before the step). Float64, in the units of the data (the
        solvers work at unit scale: a ``ValueError`` where the objective
        overflows float64).
    n_samples_seen_ : int
        Samples used so far (the running mean of :meth:`partial_fit` needs it).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when they are all strings.

    See Also
    --------
    sklearn.decomposition.MiniBatchDictionaryLearning : Overcomplete dictionaries
        with lasso or OMP codes, no orthogonality.

    Notes
    -----
    With ``A`` orthogonal and ``y = D^T x``, ``x`` Bernoulli-Gaussian,
    ``E ||A y||_4^4`` is maximized exactly at signed permutations of ``D``, which
    makes l_4 maximization a complete dictionary learner (Zhai, Yang, Liao,
    Wright, Ma, "Complete dictionary learning via l4-norm maximization over the
    orthogonal group", JMLR 2020). The online rule (Xue and Lau, "Online
    orthogonal dictionary learning based on Frank-Wolfe method",
    arXiv:2103.01484) averages stochastic gradients,
    ``G_t = (1 - rho_t) G_{t-1} + rho_t g_t``, moves towards the polar factor
    of ``G_t`` with step ``gamma_t`` and projects back on the orthogonal group.
    Here ``rho_t = min(1, 4 / sqrt(t + 1))`` and ``gamma_t = 2 / (t + 2)^(3/4)``
    with ``t`` counted from 1; the authors' code counts from 0 and does not cap
    ``rho_t``, which then exceeds 1 (an extrapolation) for the first 15 steps.

    Atoms are identifiable only up to sign and order: compare dictionaries with
    :func:`~skreg.decomposition.dictionary_recovery`, never entrywise.

    Examples
    --------
    >>> from skreg.datasets import make_orthogonal_sparse_data
    >>> from skreg.decomposition import (
    ...     OrthogonalDictionaryLearning, dictionary_recovery)
    >>> Y, D, _ = make_orthogonal_sparse_data(2000, 8, sparsity=0.2, random_state=0)
    >>> odl = OrthogonalDictionaryLearning(random_state=0, device="cpu").fit(Y)
    >>> dictionary_recovery(odl.components_, D).recovery
    1.0
    >>> odl.transform(Y[:2]).shape
    (2, 8)
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "algorithm": [StrOptions({"msp", "procrustes", "frank_wolfe"})],
        "power": [Interval(numbers.Real, 2, None, closed="neither")],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "transform_algorithm": [StrOptions({"hard", "soft", "none"})],
        "transform_alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "center": ["boolean"],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_components=None,
        *,
        algorithm="msp",
        power=4,
        alpha=1.0,
        transform_algorithm="hard",
        transform_alpha=0.1,
        center=False,
        max_iter=None,
        tol=1e-6,
        batch_size=256,
        random_state=None,
        device="auto",
        verbose=False,
    ):
        self.n_components = n_components
        self.algorithm = algorithm
        self.power = power
        self.alpha = alpha
        self.transform_algorithm = transform_algorithm
        self.transform_alpha = transform_alpha
        self.center = center
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    def _check_n_components(self, n_features):
        if self.n_components is None:
            return n_features
        if self.n_components > n_features:
            raise ValueError(
                f"n_components={self.n_components} must be at most n_features="
                f"{n_features}: orthonormal atoms cannot outnumber the dimension."
            )
        return self.n_components

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn the orthogonal dictionary from ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, at least 2 samples.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : OrthogonalDictionaryLearning
            The fitted estimator.
        """
        device = resolve_device(self.device)
        X = validate_data(self, X, dtype=[np.float64, np.float32],
                          ensure_min_samples=2)
        n_samples, n_features = X.shape
        n_components = self._check_n_components(n_features)
        rng = check_random_state(self.random_state)
        # Draws on the CPU, moved to the device: a random_state gives the same
        # start (and minibatch order) on any device.
        generator = torch_generator(rng, "cpu")
        max_iter = self.max_iter or _DEFAULT_MAX_ITER[self.algorithm]

        Y = to_tensor(X, device)
        mean = _mean(Y) if self.center else torch.zeros_like(Y[0])
        # The solvers run at unit scale (see unit_rows); the dictionary does not
        # depend on it, the objective is reported in X's units.
        Y, exponent = _at_unit_scale(Y, mean)
        A = random_orthogonal(n_components, n_features, generator=generator,
                              dtype=Y.dtype, device=device)
        if self.algorithm == "frank_wolfe":
            A, G, result = frank_wolfe(
                Y, A, power=self.power, batch_size=self.batch_size,
                max_iter=max_iter, tol=self.tol, generator=generator,
                verbose=self.verbose,
            )
            n_steps = result.n_steps
            degree = self.power
        else:
            if self.algorithm == "msp":
                A, result = msp(Y, A, power=self.power, max_iter=max_iter,
                                tol=self.tol, verbose=self.verbose)
                degree = self.power
            else:
                # Codes are at most 1 at unit scale: a threshold from 1 on
                # zeroes them all, and need not overflow to say so.
                alpha = 1.0 if exponent is None else min(
                    times_power_of_two(self.alpha, -exponent), 1.0)
                A, result = procrustes(Y, A, alpha=alpha, max_iter=max_iter,
                                       tol=self.tol, verbose=self.verbose)
                degree = 2
            # Leave the online state that streaming the same passes would leave,
            # so partial_fit continues from the fit instead of restarting with
            # large steps: the exact gradient average at the fitted dictionary and
            # the step count of n_iter passes in batches of batch_size.
            G, _ = lp_gradient(A, Y, self.power)
            n_steps = result.n_iter * -(-n_samples // self.batch_size)

        self.objective_ = _in_data_units(result.objective, exponent, degree)
        self.components_ = to_numpy(A)
        self.mean_ = to_numpy(mean)
        # In units of 2^_exponent, the largest row norm seen (see partial_fit).
        self._gradient_average = to_numpy(G)
        self._exponent = exponent
        self.n_iter_ = result.n_iter
        self.n_steps_ = n_steps
        self.n_samples_seen_ = n_samples
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the dictionary with one chunk of a stream (online Frank-Wolfe).

        The first call initializes a random orthogonal dictionary (or continues
        from a previous :meth:`fit`, with the step count and gradient average the
        fit left, see ``n_steps_``). Each chunk is cut into batches of
        ``batch_size`` samples, in order, one Frank-Wolfe step per batch; only the
        dictionary, the gradient average and two counters are kept between calls.
        The result does not depend on how a stream is chunked when every chunk
        but the last holds a multiple of ``batch_size`` samples; otherwise each
        chunk's short last batch takes a step of its own.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            One chunk of the stream; a single sample is allowed.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        self : OrthogonalDictionaryLearning
            The updated estimator.
        """
        device = resolve_device(self.device)
        first_call = not hasattr(self, "components_")
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=first_call)
        n_samples, n_features = X.shape
        if first_call:
            n_components = self._check_n_components(n_features)
            generator = torch_generator(check_random_state(self.random_state), "cpu")
            A = random_orthogonal(n_components, n_features, generator=generator,
                                  dtype=torch_dtype(X.dtype), device=device)
            self.components_ = to_numpy(A)
            self.mean_ = np.zeros(n_features, dtype=X.dtype)
            self._gradient_average = None
            self._exponent = None
            self.n_iter_ = 0
            self.n_steps_ = 0
            self.n_samples_seen_ = 0
            self.objective_ = np.empty(0, dtype=np.float64)

        dtype = self.components_.dtype
        Y = to_tensor(X, device, dtype=dtype)
        A = to_tensor(self.components_, device, dtype=dtype)
        G = (None if self._gradient_average is None
             else to_tensor(self._gradient_average, device, dtype=dtype))
        mean = to_tensor(self.mean_, device, dtype=dtype)
        if self.center:
            seen = self.n_samples_seen_
            mean = mean + (_mean(Y) - mean) * (n_samples / (seen + n_samples))
        # The steps run in units of the largest row norm seen so far, the unit
        # of the gradient average: a chunk of larger rows rescales the average,
        # a chunk of smaller ones is rescaled (see unit_rows).
        Y, exponent = _at_unit_scale(Y, mean)
        seen = self._exponent
        if exponent is None or (seen is not None and seen > exponent):
            if exponent is not None:
                Y = times_power_of_two(Y, exponent - seen)
            exponent = seen
        elif G is not None and seen is not None and exponent > seen:
            G = times_power_of_two(G, self.power * (seen - exponent))

        objectives = []
        t = self.n_steps_
        for start in range(0, n_samples, self.batch_size):
            t += 1
            A, G, f = frank_wolfe_step(A, G, Y[start:start + self.batch_size], t,
                                       power=self.power)
            objectives.append(f)

        objectives = _in_data_units(torch.stack(objectives), exponent, self.power)
        self.components_ = to_numpy(A)
        self._gradient_average = to_numpy(G)
        self._exponent = exponent
        self.mean_ = to_numpy(mean)
        self.n_steps_ = t
        self.n_samples_seen_ += n_samples
        self.objective_ = np.concatenate([self.objective_, objectives])
        return self

    def _codes(self, X):
        device = resolve_device(self.device, fallback=True)
        Y = to_tensor(X, device)
        A = to_tensor(self.components_, device, dtype=Y.dtype)
        Z = (Y - to_tensor(self.mean_, device, dtype=Y.dtype)) @ A.T
        if self.transform_algorithm == "hard":
            Z = hard_threshold(Z, self.transform_alpha)
        elif self.transform_algorithm == "soft":
            Z = soft_threshold(Z, self.transform_alpha)
        return _finite(to_numpy(Z), "codes")

    def transform(self, X):
        """Sparse codes of ``X``: thresholded projections on the atoms.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to encode.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            ``T((X - mean_) @ components_.T)`` with ``T`` the thresholding chosen
            by ``transform_algorithm``; same float dtype as ``X``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        return self._codes(X)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None):
        """Fit, then return the codes of ``X``; identical to ``fit(X).transform(X)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_components)
            The codes :meth:`transform` gives for ``X``.
        """
        return self.fit(X).transform(X)

    def inverse_transform(self, X):
        """Samples from codes: ``X @ components_ + mean_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Codes, e.g. from :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features)
            Exactly the data encoded when ``transform_algorithm="none"``.
        """
        check_is_fitted(self)
        X = check_array(X, dtype=[np.float64, np.float32], input_name="X")
        n_components = self.components_.shape[0]
        if X.shape[1] != n_components:
            raise ValueError(
                f"X has {X.shape[1]} features (codes), but "
                f"{type(self).__name__} has {n_components} components."
            )
        device = resolve_device(self.device, fallback=True)
        codes = to_tensor(X, device)
        A = to_tensor(self.components_, device, dtype=codes.dtype)
        mean = to_tensor(self.mean_, device, dtype=codes.dtype)
        return _finite(to_numpy(codes @ A + mean), "samples")

    def score(self, X, y=None):
        """Mean l_p objective ``||components_ (x - mean_)||_p^p`` over the samples.

        The quantity ``"msp"`` and ``"frank_wolfe"`` maximize: higher means
        sparser (spikier) projections. It ignores ``transform_algorithm`` and
        ``transform_alpha``, and values for different ``power`` are not
        comparable, nor are values for different ``n_components`` (each atom
        adds a term: a grid over ``n_components`` would pick the largest).
        Present so that model selection and ``dask_ml``'s ``Incremental`` work
        without a scorer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Data to score.
        y : Ignored
            Not used, present for API consistency.

        Returns
        -------
        score : float
            The mean l_p objective.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        device = resolve_device(self.device, fallback=True)
        Y = to_tensor(X, device)
        A = to_tensor(self.components_, device, dtype=Y.dtype)
        Y, exponent = _at_unit_scale(Y, to_tensor(self.mean_, device,
                                                  dtype=Y.dtype))
        return float(_in_data_units(lp_objective(A, Y, self.power), exponent,
                                    self.power))

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
