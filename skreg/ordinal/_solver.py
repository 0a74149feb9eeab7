"""Cumulative-logit likelihood and the PRESTO / proportional-odds solvers.

Pure functions over torch tensors. Conventions shared by every function:

* ``X`` is ``(n, p)``, ``y`` holds class indices ``0 .. K-1`` (int64), ``w`` holds
  sample weights normalised to sum to one, so every loss is a weighted *mean*.
* ``P(y <= k | x) = sigmoid(eta_k)`` with ``eta_k = intercept_k + x . beta_k``
  for ``k = 0 .. K-2`` (the sign convention of the PRESTO authors' code).
* PRESTO works in the difference parameterization ``psi_0 = beta_0``,
  ``psi_k = beta_k - beta_{k-1}``, i.e. ``beta = cumsum(psi)``; its fused penalty
  becomes a plain (elastic-net) penalty on ``psi``.

The negative log-likelihood of an observation of class ``c`` depends on the two
adjacent cumulative logits ``a = eta_{c-1}`` and ``b = eta_c`` (with
``eta_{-1} = -inf`` and ``eta_{K-1} = +inf``) through

``-log(sigmoid(b) - sigmoid(a)) = -logsigmoid(b) - logsigmoid(-a) - log(1 - e^{a-b})``,

which is finite only when ``a < b``: observations whose fitted curves cross at
their own class lie outside the domain and make the objective ``+inf``. The
likelihood is log-concave (Pratt, 1981), so both problems are convex on that domain.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class SolverResult:
    """What a solver reports besides its parameters."""

    n_iter: int
    converged: bool
    objective: float
    kkt_violation: float


def _padded_logits(eta):
    """Prepend ``-inf`` and append ``+inf`` so edge classes need no special case."""
    n = eta.shape[0]
    neg = torch.full((n, 1), -math.inf, dtype=eta.dtype, device=eta.device)
    return torch.cat([neg, eta, -neg], dim=1)


def _adjacent_logits(eta, y):
    padded = _padded_logits(eta)
    lower = padded.gather(1, y.unsqueeze(1)).squeeze(1)
    upper = padded.gather(1, (y + 1).unsqueeze(1)).squeeze(1)
    return lower, upper


def _active_gap(upper, lower, w):
    """``upper - lower`` where the weight is positive, ``+inf`` where it is zero.

    A zero-weight row lies outside the likelihood (its fitted curves may even
    cross at its class); an infinite gap makes every derivative term of it exactly
    zero, where ``0 * inf`` would give ``nan``.
    """
    gap = (upper - lower).clamp_min(torch.finfo(upper.dtype).tiny)
    return torch.where(w > 0, gap, torch.full_like(gap, math.inf))


def _log1mexp(d):
    """``log(1 - exp(d))`` for ``d <= 0``, accurate on both sides of ``-log 2``."""
    return torch.where(
        d > -math.log(2.0), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d))
    )


def cumulative_logit_nll(eta, y, w):
    """Weighted mean negative log-likelihood of the cumulative logit model.

    Parameters
    ----------
    eta : torch.Tensor of shape (n, K-1)
        Cumulative logits ``eta_k = logit P(y <= k | x)``.
    y : torch.Tensor of shape (n,)
        Class indices in ``0 .. K-1``.
    w : torch.Tensor of shape (n,)
        Non-negative weights summing to one.

    Returns
    -------
    torch.Tensor
        A scalar; ``+inf`` when an observation with positive weight has a
        non-positive probability for its own class (crossed curves).
    """
    lower, upper = _adjacent_logits(eta, y)
    gap = lower - upper
    feasible = (gap < 0) | (w == 0)
    safe_gap = torch.where(feasible, gap, torch.full_like(gap, -1.0))
    log_prob = (
        torch.nn.functional.logsigmoid(upper)
        + torch.nn.functional.logsigmoid(-lower)
        + _log1mexp(safe_gap)
    )
    nll = -(w * torch.where(w > 0, log_prob, torch.zeros_like(log_prob))).sum()
    return torch.where(feasible.all(), nll, torch.full_like(nll, math.inf))


def cumulative_logit_grad(eta, y, w):
    """Gradient of :func:`cumulative_logit_nll` with respect to ``eta``.

    With ``u = b - a > 0``: ``dl/db = -(sigmoid(-b) + 1/expm1(u))`` and
    ``dl/da = sigmoid(a) + 1/expm1(u)``. Only meaningful on the domain.
    """
    lower, upper = _adjacent_logits(eta, y)
    u = _active_gap(upper, lower, w)
    # 1/expm1(u) written with exp(-u) so that u -> inf gives 0, not nan
    inv = torch.exp(-u) / (-torch.expm1(-u))
    d_upper = -w * (torch.sigmoid(-upper) + inv)
    d_lower = w * (torch.sigmoid(lower) + inv)
    n, km1 = eta.shape
    grad = torch.zeros((n, km1 + 2), dtype=eta.dtype, device=eta.device)
    grad.scatter_add_(1, (y + 1).unsqueeze(1), d_upper.unsqueeze(1))
    grad.scatter_add_(1, y.unsqueeze(1), d_lower.unsqueeze(1))
    return grad[:, 1:-1]


def cumulative_logit_hessian(eta, y, w):
    """Per-observation Hessian of the loss with respect to ``eta``, ``(n, K-1, K-1)``.

    Each observation touches two adjacent logits ``(a, b)``; with ``u = b - a`` and
    ``q = e^{-u} / (1 - e^{-u})^2`` its block is
    ``[[s(a)s(-a) + q, -q], [-q, s(b)s(-b) + q]]`` (``s`` the sigmoid), weighted.
    """
    lower, upper = _adjacent_logits(eta, y)
    u = _active_gap(upper, lower, w)
    q = torch.exp(-u) / torch.expm1(-u).square()
    h_upper = w * (torch.sigmoid(upper) * torch.sigmoid(-upper) + q)
    h_lower = w * (torch.sigmoid(lower) * torch.sigmoid(-lower) + q)
    h_cross = -w * q
    n, km1 = eta.shape
    hess = torch.zeros((n, km1 + 2, km1 + 2), dtype=eta.dtype, device=eta.device)
    rows = torch.arange(n, device=eta.device)
    hess[rows, y + 1, y + 1] = h_upper
    hess[rows, y, y] = h_lower
    hess[rows, y, y + 1] = h_cross
    hess[rows, y + 1, y] = h_cross
    return hess[:, 1:-1, 1:-1]


#: A fitted cumulative logit beyond this, on an observation's own side, gives it a
#: tail probability below ``e^-30 ~ 1e-13``: numerically 0 or 1.
SATURATION_LOGIT = 30.0


def _newton_logit_step(X, y, w, eta, parallel):
    """The change of ``eta`` that one Newton step of the unpenalized model makes.

    ``parallel`` selects the proportional-odds model (free intercepts, one
    shared slope vector), otherwise every threshold has its own intercept and
    slopes. Returns ``(n, K-1)``.
    """
    n, km1 = eta.shape
    g_eta = cumulative_logit_grad(eta, y, w)
    h_eta = cumulative_logit_hessian(eta, y, w)
    if parallel:
        row_sums = h_eta.sum(2)
        grad = torch.cat([g_eta.sum(0), X.T @ g_eta.sum(1)])
        hess = torch.cat([
            torch.cat([h_eta.sum(0), row_sums.T @ X], 1),
            torch.cat([X.T @ row_sums, X.T @ (row_sums.sum(1, keepdim=True) * X)], 1),
        ])
    else:
        X = torch.cat([torch.ones((n, 1), dtype=X.dtype, device=X.device), X], 1)
        d = X.shape[1]
        grad = (g_eta.T @ X).reshape(-1)
        hess = torch.zeros((km1, d, km1, d), dtype=X.dtype, device=X.device)
        # each observation couples only its two adjacent thresholds
        for k in range(km1):
            for m in range(max(k - 1, 0), min(k + 2, km1)):
                hess[k, :, m, :] = X.T @ (h_eta[:, k, m, None] * X)
        hess = hess.reshape(km1 * d, km1 * d)
    # floored so that a Hessian that underflowed to 0 stays invertible
    jitter = (1e-12 * hess.diagonal().abs().max()).clamp_min(
        torch.finfo(X.dtype).tiny)
    eye = torch.eye(hess.shape[0], dtype=X.dtype, device=X.device)
    step = -torch.linalg.solve(hess + jitter * eye, grad)
    if parallel:
        return step[:km1] + (X @ step[km1:]).unsqueeze(1)
    return X @ step.reshape(km1, -1).T


def separation_suspected(X, y, w, eta, parallel):
    """Whether the fit ``eta`` looks like a divergent path on separable data.

    On (quasi-)separable data the maximum-likelihood estimate does not exist: the
    iterates diverge along a separating direction while the gradient decays
    below any tolerance. Two marks together identify it: some positive-weight
    observation is fitted with certainty (an adjacent cumulative logit beyond
    :data:`SATURATION_LOGIT` on its own side; a heavy-tailed feature can do
    that at a finite optimum too), and a Newton step of the unpenalized model
    still moves a training logit by ``O(1)`` (it is ~0 at a finite optimum, and
    ~1 per step along ``e^{-t}`` on a separating direction).

    Parameters
    ----------
    X, y, w : torch.Tensor
        Design ``(n, p)``, class indices ``(n,)``, weights summing to one.
    eta : torch.Tensor of shape (n, K-1)
        Fitted cumulative logits of the training observations.
    parallel : bool
        Whether the unpenalized directions are those of the proportional-odds
        model (``True``) or of separate cumulative logits (``False``).

    Returns
    -------
    bool
    """
    lower, upper = _adjacent_logits(eta, y)
    active = w > 0
    sure = ((upper > SATURATION_LOGIT) & torch.isfinite(upper)) | (
        (lower < -SATURATION_LOGIT) & torch.isfinite(lower))
    if not bool((sure & active).any()):
        return False
    step_lower, step_upper = _adjacent_logits(
        _newton_logit_step(X, y, w, eta, parallel), y)
    moved = torch.where(torch.isfinite(step_lower), step_lower.abs(), 0.0)
    moved = torch.maximum(moved, torch.where(torch.isfinite(step_upper),
                                             step_upper.abs(), 0.0))
    return bool((moved[active] > 0.5).any())


def cumulative_share_logits(shares):
    """Logits of the cumulative class shares, ``(..., K)`` to ``(..., K-1)``.

    ``logit(s_0 + .. + s_k) = log(s_0 + .. + s_k) - log(s_{k+1} + .. + s_{K-1})``,
    each sum taken from its own end: a share far below the others (a tiny
    sample weight) is not lost in ``1 - cumsum``, where it would make two
    thresholds equal and its class impossible.
    """
    tiny = torch.finfo(shares.dtype).tiny
    below = torch.cumsum(shares, -1)[..., :-1].clamp_min(tiny)
    above = _reverse_cumsum(shares, -1)[..., 1:].clamp_min(tiny)
    return torch.log(below) - torch.log(above)


def intercept_only_logits(y, w, n_classes):
    """Maximum-likelihood intercepts without covariates: logits of cumulative shares."""
    shares = torch.zeros(n_classes, dtype=w.dtype, device=w.device)
    shares.scatter_add_(0, y, w)
    return cumulative_share_logits(shares)


# ---------------------------------------------------------------------------
# PRESTO: fused-difference penalty, solved by FISTA in the psi parameterization
# ---------------------------------------------------------------------------


@dataclass
class CumulativeDesign:
    """A batch of PRESTO problems, ready for the loss and its derivatives.

    ``B`` independent problems (cross-validation folds and the full data) are
    solved together: ``theta`` is ``(B, D)`` with, per problem,
    ``[intercept (K-1), psi (K-1, p) flattened]``. ``X`` is ``(B, n, p)``;
    ``upper_index``/``lower_index`` pick each observation's two adjacent logits
    ``eta_{y_i}`` and ``eta_{y_i - 1}``; ``upper_offset`` is ``+inf`` for the top
    class and ``lower_offset`` is ``-inf`` for the bottom one (both for the zero-
    weight rows that pad the problems to one size). ``penalized`` is 1 on the
    penalized entries of ``theta``.
    """

    X: torch.Tensor
    y: torch.Tensor
    upper_index: torch.Tensor
    lower_index: torch.Tensor
    upper_offset: torch.Tensor
    lower_offset: torch.Tensor
    w: torch.Tensor
    penalized: torch.Tensor
    n_classes: int

    def split(self, theta):
        """``(intercept, psi)`` of a ``(B, D)`` parameter batch."""
        km1 = self.n_classes - 1
        return theta[:, :km1], theta[:, km1:].reshape(theta.shape[0], km1, -1)


def cumulative_design(X, y, w, n_classes, penalize_first=True):
    """Build the :class:`CumulativeDesign` (a batch of one) for ``(X, y, w)``."""
    p = X.shape[1]
    km1 = n_classes - 1
    upper_offset = torch.where(y == km1, math.inf, 0.0).to(X.dtype)
    lower_offset = torch.where(y == 0, -math.inf, 0.0).to(X.dtype)
    mask = penalty_mask(km1, penalize_first, X.dtype, X.device).expand(km1, p)
    penalized = torch.cat([torch.zeros(km1, dtype=X.dtype, device=X.device),
                           mask.reshape(-1)])
    return CumulativeDesign(
        X.unsqueeze(0), y.unsqueeze(0), y.clamp(0, km1 - 1).unsqueeze(0),
        (y - 1).clamp(0, km1 - 1).unsqueeze(0), upper_offset.unsqueeze(0),
        lower_offset.unsqueeze(0), w.unsqueeze(0), penalized, n_classes)


def stack_designs(designs):
    """One batched design from several (same ``K``, ``p`` and penalty), padded."""
    n_max = max(d.X.shape[1] for d in designs)

    def pad(t, value):
        extra = n_max - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra) + tuple(t.shape[2:])
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype,
                                         device=t.device)], dim=1)

    def stack(name, value):
        return torch.cat([pad(getattr(d, name), value) for d in designs])

    first = designs[0]
    return CumulativeDesign(
        stack("X", 0.0), stack("y", 0), stack("upper_index", 0),
        stack("lower_index", 0), stack("upper_offset", math.inf),
        stack("lower_offset", -math.inf), stack("w", 0.0), first.penalized,
        first.n_classes)


def _logits(design, theta):
    intercept, psi = design.split(theta)
    beta = torch.cumsum(psi, 1)
    eta = intercept.unsqueeze(1) + torch.bmm(design.X, beta.transpose(1, 2))
    upper = eta.gather(2, design.upper_index.unsqueeze(2)).squeeze(2)
    lower = eta.gather(2, design.lower_index.unsqueeze(2)).squeeze(2)
    return upper + design.upper_offset, lower + design.lower_offset


def _design_loss(design, theta):
    upper, lower = _logits(design, theta)
    w = design.w
    gap = lower - upper
    feasible = (gap < 0) | (w == 0)
    safe_gap = torch.where(feasible, gap, torch.full_like(gap, -1.0))
    log_prob = (torch.nn.functional.logsigmoid(upper)
                + torch.nn.functional.logsigmoid(-lower) + _log1mexp(safe_gap))
    nll = -(w * torch.where(w > 0, log_prob, torch.zeros_like(log_prob))).sum()
    return torch.where(feasible.all(), nll, torch.full_like(nll, math.inf)), (
        upper, lower)


def _to_thresholds(design, upper_values, lower_values):
    """Scatter per-observation values on their two logits: ``(B, n, K-1)``."""
    B, n = design.w.shape
    out = torch.zeros((B, n, design.n_classes - 1), dtype=design.X.dtype,
                      device=design.X.device)
    out.scatter_add_(2, design.upper_index.unsqueeze(2), upper_values.unsqueeze(2))
    out.scatter_add_(2, design.lower_index.unsqueeze(2), lower_values.unsqueeze(2))
    return out


def _reverse_cumsum(t, dim):
    return torch.flip(torch.cumsum(torch.flip(t, (dim,)), dim), (dim,))


def _design_grad(design, logits):
    upper, lower = logits
    u = _active_gap(upper, lower, design.w)
    inv = torch.exp(-u) / (-torch.expm1(-u))
    # the top (bottom) class has no upper (lower) logit: its offset is infinite
    # and its derivative below is exactly zero, so the clamped index adds nothing
    d_upper = -design.w * (torch.sigmoid(-upper) + inv)
    d_lower = design.w * (torch.sigmoid(lower) + inv)
    g_eta = _to_thresholds(design, d_upper, d_lower)
    g_beta = torch.bmm(g_eta.transpose(1, 2), design.X)
    # beta_k = sum_{j<=k} psi_j, so d/dpsi_j sums the beta gradients for k >= j
    g_psi = _reverse_cumsum(g_beta, 1)
    return torch.cat([g_eta.sum(1), g_psi.reshape(g_psi.shape[0], -1)], dim=1)


def _design_hessian_diagonal(design, logits):
    upper, lower = logits
    u = _active_gap(upper, lower, design.w)
    q = torch.exp(-u) / torch.expm1(-u).square()
    w = design.w
    h_upper = w * (torch.sigmoid(upper) * torch.sigmoid(-upper) + q)
    h_lower = w * (torch.sigmoid(lower) * torch.sigmoid(-lower) + q)
    h_intercept = _to_thresholds(design, h_upper, h_lower).sum(1)
    # psi_j enters eta_k for every k >= j: both adjacent logits of an interior
    # class read it when j <= y_i - 1, and then the cross term -2q counts too
    cross = torch.where(torch.isfinite(lower) & torch.isfinite(upper), -2 * w * q,
                        torch.zeros_like(q))
    per_row = _reverse_cumsum(_to_thresholds(design, h_upper, h_lower + cross), 2)
    h_psi = torch.bmm(per_row.transpose(1, 2), design.X.square())
    return torch.cat([h_intercept, h_psi.reshape(h_psi.shape[0], -1)], dim=1)


def _soft_threshold(z, threshold):
    return torch.sign(z) * (z.abs() - threshold).clamp_min(0.0)


def penalty_mask(n_thresholds, penalize_first, dtype, device):
    """Which rows of ``psi`` carry the penalty, as a ``(K-1, 1)`` 0/1 tensor."""
    mask = torch.ones((n_thresholds, 1), dtype=dtype, device=device)
    if not penalize_first:
        mask[0] = 0.0
    return mask


def kkt_violation(grad, theta, lasso, penalized):
    """Largest entry of the minimum-norm subgradient (0 exactly at the optimum).

    ``grad`` is the gradient of the smooth part (likelihood and ridge) at ``theta``.
    """
    weight = lasso * penalized
    at_zero = (grad.abs() - weight).clamp_min(0.0)
    off_zero = (grad + weight * torch.sign(theta)).abs()
    return torch.where(theta == 0, at_zero, off_zero).max()


def _pack(intercept, psi):
    """Flat ``(B, D)`` parameters from ``(B, K-1)`` intercepts and ``(B, K-1, p)``."""
    return torch.cat([intercept, psi.reshape(psi.shape[0], -1)], dim=1)


def presto_objective(X, y, w, intercept, psi, lam, l1_ratio, penalize_first=True):
    """Penalized objective of PRESTO at ``(intercept, psi)``.

    ``nll + lam * sum_k m_k (l1_ratio ||psi_k||_1 + (1 - l1_ratio)/2 ||psi_k||^2)``
    with ``m_0 = penalize_first`` and ``m_k = 1`` for the differences.
    """
    design = cumulative_design(X, y, w, intercept.shape[0] + 1, penalize_first)
    theta = _pack(intercept.unsqueeze(0), psi.unsqueeze(0))
    nll, _ = _design_loss(design, theta)
    pen = design.penalized * theta
    return nll + lam * (l1_ratio * pen.abs().sum()
                        + 0.5 * (1 - l1_ratio) * pen.square().sum())


def presto_lambda_max(design, intercept, psi, l1_ratio):
    """Smallest ``lam`` whose solution has every penalized ``psi`` entry at zero.

    ``(intercept, psi)`` must be the fit with the penalized entries fixed at zero
    (intercept-only when the first vector is penalized, else proportional odds).
    For a ridge (``l1_ratio = 0``) the value is computed as for
    ``l1_ratio = 1e-3``, as glmnet does. Batched designs give the largest value
    over the batch.
    """
    theta = _pack(intercept, psi)
    _, logits = _design_loss(design, theta)
    grad = _design_grad(design, logits)
    return (design.penalized * grad).abs().max() / max(l1_ratio, 1e-3)


def fit_presto(design, lam, l1_ratio=1.0, *, intercept=None, psi=None,
               max_iter=1000, tol=1e-6):
    """Solve the PRESTO problem by preconditioned FISTA with backtracking.

    Parameters
    ----------
    design : CumulativeDesign
        The data, from :func:`cumulative_design` (standardized features,
        weights summing to one, which rows of ``psi`` are penalized), or a batch
        of independent problems from :func:`stack_designs`, solved together: the
        objective is their sum, so one step size, one momentum and a KKT check
        over the whole batch serve all of them.
    lam : float
        Penalty strength ``lambda >= 0``.
    l1_ratio : float
        Share of the L1 part of the elastic-net penalty on ``psi``.
    intercept, psi : torch.Tensor, optional
        Starting point ``(B, K-1)`` and ``(B, K-1, p)`` (a warm start); by
        default, or when it lies outside the likelihood's domain, the
        intercept-only fit.
    max_iter : int
        Maximum number of accepted FISTA steps.
    tol : float
        Stop when the largest entry of the minimum-norm subgradient (the KKT
        violation) is at most ``tol``.

    Returns
    -------
    intercept : torch.Tensor of shape (B, K-1)
    psi : torch.Tensor of shape (B, K-1, p)
    result : SolverResult

    Notes
    -----
    The steps are scaled by the diagonal of the Hessian at the starting point
    (a fixed metric, so FISTA's guarantees hold in the rescaled variables): the
    thresholds of rare classes have far less curvature than the shared slopes.
    A trial point outside the likelihood's domain has objective ``+inf`` and is
    rejected by the backtracking test, so the step shrinks until the fitted curves
    no longer cross at any observed class; an extrapolated point outside the domain
    restarts the momentum, as does an increase of the objective (O'Donoghue &
    Candes, 2015). The step grows by 10% after every accepted step.
    """
    km1 = design.n_classes - 1
    ref = design.X
    n_coef = (ref.shape[0], km1 * (1 + ref.shape[2]))
    penalized = design.penalized
    ridge, lasso = lam * (1.0 - l1_ratio), lam * l1_ratio

    def smooth(theta):
        nll, logits = _design_loss(design, theta)
        return nll + 0.5 * ridge * (penalized * theta).square().sum(), logits

    def smooth_grad(theta, logits):
        return _design_grad(design, logits) + ridge * penalized * theta

    def nonsmooth(theta):
        return lasso * (penalized * theta).abs().sum()

    if intercept is None or psi is None:
        theta = torch.zeros(n_coef, dtype=ref.dtype, device=ref.device)
        theta[:, :km1] = intercept_only_logits_from_design(design)
    else:
        theta = _pack(intercept, psi).clone()
    f_x, logits = smooth(theta)
    if not bool(torch.isfinite(f_x)):
        # a warm start can lie outside the domain of new data: start afresh
        theta = torch.zeros_like(theta)
        theta[:, :km1] = intercept_only_logits_from_design(design)
        f_x, logits = smooth(theta)
    g_x = smooth_grad(theta, logits)
    curvature = _design_hessian_diagonal(design, logits) + ridge * penalized
    metric = curvature.clamp_min(1e-3 * curvature.amax(1, keepdim=True))
    kkt = kkt_violation(g_x, theta, lasso, penalized)
    converged = bool(kkt <= tol)
    x, obj_x, logits_x = theta, f_x + nonsmooth(theta), logits
    y_pt, f_y, g_y = x, f_x, g_x
    step, momentum, n_iter = 1.0, 1.0, 0
    while not converged and n_iter < max_iter:
        n_iter += 1
        for _ in range(60):
            scale = step / metric
            trial = y_pt - scale * g_y
            trial = torch.where(penalized > 0,
                                _soft_threshold(trial, scale * lasso), trial)
            d = trial - y_pt
            f_new, logits_new = smooth(trial)
            model = f_y + (g_y * d).sum() + (metric * d.square()).sum() / (2 * step)
            if bool(f_new <= model + 1e-12 * f_y.abs()):
                break
            step *= 0.5
        obj_new = f_new + nonsmooth(trial)
        if bool(obj_new > obj_x) and y_pt is not x:
            momentum = 1.0
            if g_x is None:
                g_x = smooth_grad(x, logits_x)
            y_pt, f_y, g_y = x, f_x, g_x
            continue
        x_prev = x
        x, f_x, obj_x, logits_x = trial, f_new, obj_new, logits_new
        g_x = None
        # the prox step's residual bounds the subgradient at x up to the gradient
        # change; only when it is small is the exact KKT check worth a gradient
        if bool((metric * d).abs().max() <= tol * step):
            g_x = smooth_grad(x, logits_x)
            kkt = kkt_violation(g_x, x, lasso, penalized)
            if bool(kkt <= tol):
                converged = True
                break
        next_momentum = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum**2))
        candidate = x + ((momentum - 1.0) / next_momentum) * (x - x_prev)
        momentum = next_momentum
        f_cand, logits_cand = smooth(candidate)
        if bool(torch.isfinite(f_cand)):
            y_pt, f_y, g_y = candidate, f_cand, smooth_grad(candidate, logits_cand)
        else:
            momentum = 1.0
            if g_x is None:
                g_x = smooth_grad(x, logits_x)
            y_pt, f_y, g_y = x, f_x, g_x
        step *= 1.1
    if not converged:
        kkt = kkt_violation(smooth_grad(x, logits_x), x, lasso, penalized)
    intercept, psi = design.split(x)
    result = SolverResult(n_iter=n_iter, converged=converged,
                          objective=float(obj_x), kkt_violation=float(kkt))
    return intercept, psi, result


def intercept_only_logits_from_design(design):
    """Intercept-only maximum-likelihood thresholds of each problem, ``(B, K-1)``."""
    shares = torch.zeros((design.w.shape[0], design.n_classes), dtype=design.w.dtype,
                         device=design.w.device)
    shares.scatter_add_(1, design.y, design.w)
    return cumulative_share_logits(shares)


# ---------------------------------------------------------------------------
# Proportional odds: damped Newton on the exact Hessian
# ---------------------------------------------------------------------------


def proportional_odds_nll(X, y, w, intercept, coef):
    """Weighted mean negative log-likelihood of the proportional-odds model."""
    return cumulative_logit_nll(intercept + (X @ coef).unsqueeze(1), y, w)


def fit_proportional_odds(X, y, w, n_classes, *, intercept=None, coef=None,
                          max_iter=100, tol=1e-10):
    """Maximum-likelihood proportional-odds (cumulative logit) fit by Newton.

    Parameters
    ----------
    X, y, w : torch.Tensor
        Design ``(n, p)``, class indices ``(n,)``, weights summing to one.
    n_classes : int
        ``K``.
    intercept, coef : torch.Tensor, optional
        Starting point; by default the intercept-only fit and zero slopes.
    max_iter : int
        Maximum number of Newton steps.
    tol : float
        Stop when the largest gradient entry is at most ``tol``.

    Returns
    -------
    intercept : torch.Tensor of shape (K-1,)
    coef : torch.Tensor of shape (p,)
    result : SolverResult

    Notes
    -----
    The Hessian is assembled from the per-observation ``2 x 2`` blocks of
    :func:`cumulative_logit_hessian`; a backtracking (Armijo) line search keeps
    every iterate inside the domain where the thresholds are ordered for each
    observed class. A tiny ridge on the Newton system guards against separable
    data, where the Hessian becomes singular.
    """
    n, p = X.shape
    km1 = n_classes - 1
    if intercept is None:
        intercept = intercept_only_logits(y, w, n_classes)
    if coef is None:
        coef = torch.zeros(p, dtype=X.dtype, device=X.device)
    intercept, coef = intercept.clone(), coef.clone()
    eta = intercept + (X @ coef).unsqueeze(1)
    f = cumulative_logit_nll(eta, y, w)
    eye = torch.eye(km1 + p, dtype=X.dtype, device=X.device)
    n_iter, converged, grad_norm = 0, False, math.inf
    for n_iter in range(1, max_iter + 1):
        g_eta = cumulative_logit_grad(eta, y, w)
        grad = torch.cat([g_eta.sum(0), X.T @ g_eta.sum(1)])
        grad_norm = grad.abs().max()
        if bool(grad_norm <= tol):
            converged = True
            n_iter -= 1
            break
        h_eta = cumulative_logit_hessian(eta, y, w)
        row_sums = h_eta.sum(2)
        hess = torch.empty((km1 + p, km1 + p), dtype=X.dtype, device=X.device)
        hess[:km1, :km1] = h_eta.sum(0)
        hess[:km1, km1:] = row_sums.T @ X
        hess[km1:, :km1] = hess[:km1, km1:].T
        hess[km1:, km1:] = X.T @ (row_sums.sum(1, keepdim=True) * X)
        jitter = 1e-12 * hess.diagonal().abs().max()
        direction = -torch.linalg.solve(hess + jitter * eye, grad)
        slope = (grad * direction).sum()
        t = 1.0
        for _ in range(50):
            new_int = intercept + t * direction[:km1]
            new_coef = coef + t * direction[km1:]
            new_eta = new_int + (X @ new_coef).unsqueeze(1)
            f_new = cumulative_logit_nll(new_eta, y, w)
            if bool(f_new <= f + 1e-4 * t * slope):
                break
            t *= 0.5
        else:
            # no decrease at machine precision: the current point is the optimum
            # to the accuracy the arithmetic allows
            break
        intercept, coef, eta, f = new_int, new_coef, new_eta, f_new
    result = SolverResult(n_iter=n_iter, converged=converged, objective=float(f),
                          kkt_violation=float(grad_norm))
    return intercept, coef, result


def class_log_probabilities(eta):
    """Log class probabilities ``(n, K)`` from cumulative logits, after rearrangement.

    Where the fitted curves cross, the cumulative probabilities are sorted
    (monotone rearrangement, Chernozhukov, Fernandez-Val & Galichon, 2010). The
    sigmoid is increasing, so that is sorting ``eta``; then for adjacent sorted
    logits ``a <= b``, ``log(sigmoid(b) - sigmoid(a))`` is
    ``logsigmoid(b) + logsigmoid(-a) + log(1 - e^{a-b})``, accurate however far
    out ``a`` and ``b`` lie (``-inf`` only when ``a = b``). Where the probability
    is a normal floating-point number the result is the log of that number, so
    it agrees with :func:`class_probabilities` to the last bit (a probability
    that rounds to 1 has log 0); only where it underflows does the direct value
    show.
    """
    padded = _padded_logits(torch.sort(eta, dim=1).values)
    lower, upper = padded[:, :-1], padded[:, 1:]
    # equal logits (infinite ones included, where X @ coef overflowed) leave
    # nothing between them; their difference would be inf - inf = nan
    gap = torch.where(lower == upper, 0.0, lower - upper)
    log_proba = (torch.nn.functional.logsigmoid(upper)
                 + torch.nn.functional.logsigmoid(-lower) + _log1mexp(gap))
    proba = torch.exp(log_proba)
    return torch.where(proba >= torch.finfo(proba.dtype).tiny, torch.log(proba),
                       log_proba)


def class_probabilities(eta):
    """Class probabilities ``(n, K)``: the exponential of
    :func:`class_log_probabilities`, free of the cancellation in a difference of
    sigmoids."""
    return torch.exp(class_log_probabilities(eta))
