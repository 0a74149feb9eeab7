"""Pure-torch solvers for sparsity-constrained optimal transport.

Every function works on a leading batch dimension ``B``: ``a`` is ``(B, n)``,
``b`` is ``(B, m)``, ``C`` is ``(B, n, m)``. A plan is stored column-wise and
sparse: ``idx`` (``(B, k, m)``, the candidate rows of each column) and ``vals``
(the mass on them), so every step after the top-k selection costs ``O(k m)``.

The maths follows Liu, Puigcerver and Blondel, "Sparsity-Constrained Optimal
Transport", ICLR 2023, with POT's scaling: ``gamma`` multiplies the quadratic term
``(gamma / 2) ||P||_F^2``.
"""

from dataclasses import dataclass

import torch

__all__ = [
    "SolverResult",
    "dual_objective",
    "project_simplex_sorted",
    "semi_dual_objective",
    "solve_dual",
    "solve_semi_dual",
    "solve_on_support",
]


@dataclass
class SolverResult:
    """What a solve returns: potentials, the sparse plan and diagnostics.

    ``alpha`` is ``(B, n)``, ``beta`` is ``(B, m)``; ``idx`` and ``vals`` are
    ``(B, k, m)``; ``n_iter`` and ``converged`` are per problem.
    """

    alpha: torch.Tensor
    beta: torch.Tensor
    idx: torch.Tensor
    vals: torch.Tensor
    dual_objective: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor


def project_simplex_sorted(v):
    """Euclidean projection of each column of ``v`` onto the probability simplex.

    ``v`` (``(B, k, m)``) must be sorted in decreasing order along dimension 1,
    as :func:`torch.topk` returns it. Returns the projection (same shape).
    """
    k = v.shape[1]
    cumsum = v.cumsum(dim=1)
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device).view(1, k, 1)
    # For sorted v the condition holds on a prefix; its length is the support size.
    support = (v - (cumsum - 1.0) / ranks) > 0
    size = support.sum(dim=1, keepdim=True).clamp(min=1)
    tau = (cumsum.gather(1, size - 1) - 1.0) / size.to(v.dtype)
    return (v - tau).clamp(min=0.0)


def _select(scores, k, idx):
    """Top-k rows of each column (sorted), or the given rows re-sorted."""
    if idx is None:
        return scores.topk(k, dim=1, sorted=True)
    picked = scores.gather(1, idx)
    picked, order = picked.sort(dim=1, descending=True)
    return picked, idx.gather(1, order)


def semi_dual_objective(alpha, a, b, C, gamma, k, idx=None):
    """Semi-dual objective, its gradient and the plan it reads out.

    Parameters
    ----------
    alpha : Tensor of shape (B, n)
    a, b : Tensors of shape (B, n) and (B, m)
    C : Tensor of shape (B, n, m)
    gamma : float
    k : int
        Maximum number of nonzeros per column.
    idx : Tensor of shape (B, k', m), default=None
        Restrict each column to these rows instead of its top-k entries (the
        repair problem).

    Returns
    -------
    value : Tensor of shape (B,)
        ``<alpha, a> - sum_j b_j maxOmega_j(alpha - C[:, j])``.
    grad : Tensor of shape (B, n)
        ``a - P 1`` where ``P`` is the read-out plan.
    idx, t : Tensors of shape (B, k, m)
        The plan's rows and its column-normalized mass (``P[idx, j] = b_j t``).
    """
    # A massless column receives nothing; any positive scale keeps it finite.
    scale = gamma * torch.where(b > 0, b, torch.ones_like(b)).unsqueeze(1)
    scores = (alpha.unsqueeze(2) - C) / scale
    picked, idx = _select(scores, k, idx)
    t = project_simplex_sorted(picked)
    inner = (picked * t).sum(dim=1) - 0.5 * (t * t).sum(dim=1)
    value = (alpha * a).sum(dim=1) - (gamma * b * b * inner).sum(dim=1)
    rows = torch.zeros_like(alpha).scatter_add_(1, idx.flatten(1),
                                                (t * b.unsqueeze(1)).flatten(1))
    return value, a - rows, idx, t


def dual_objective(alpha, beta, a, b, C, gamma, k, idx=None):
    """Dual objective in ``(alpha, beta)``, its gradients and the read-out plan.

    ``delta_Omega(s) = (1 / 2 gamma) sum_{top-k} [s]_+^2`` per column, with
    ``s = alpha + beta_j - C[:, j]``; the plan is ``[s]_+ / gamma`` on the top-k.

    Returns
    -------
    value : Tensor of shape (B,)
    grad_alpha, grad_beta : Tensors of shape (B, n) and (B, m)
    idx, vals : Tensors of shape (B, k, m)
        The plan's rows and masses.
    """
    s = alpha.unsqueeze(2) + beta.unsqueeze(1) - C
    picked, idx = _select(s, k, idx)
    vals = picked.clamp(min=0.0) / gamma
    value = ((alpha * a).sum(dim=1) + (beta * b).sum(dim=1)
             - 0.5 * gamma * (vals * vals).sum(dim=(1, 2)))
    rows = torch.zeros_like(alpha).scatter_add_(1, idx.flatten(1), vals.flatten(1))
    return value, a - rows, b - vals.sum(dim=1), idx, vals


def _laplacian_matvec(v, idx, active):
    """Apply the generalized Hessian of the semi-dual (times ``-gamma``) to ``v``.

    Column ``j`` with active rows ``A_j`` contributes ``I_A - 1_A 1_A^T / |A|``:
    the Laplacian of a clique, so the sum is a graph Laplacian whose null space
    holds the global shift and the rows no column selects.
    """
    weights = active.to(v.dtype)
    picked = v.gather(1, idx.flatten(1)).view_as(weights)
    size = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (picked * weights).sum(dim=1, keepdim=True) / size
    contrib = weights * (picked - mean)
    return torch.zeros_like(v).scatter_add_(1, idx.flatten(1), contrib.flatten(1))


def _laplacian_diagonal(v, idx, active):
    weights = active.to(v.dtype)
    size = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    contrib = weights * (1.0 - 1.0 / size)
    return torch.zeros_like(v).scatter_add_(1, idx.flatten(1), contrib.flatten(1))


def _laplacian_dense(n, idx, active, dtype):
    """The Laplacian of :func:`_laplacian_matvec` as a dense ``(B, n, n)`` matrix."""
    weights = active.to(dtype)
    batch, k, m = idx.shape
    size = weights.sum(dim=1, keepdim=True).clamp(min=1.0)
    pair = (weights.unsqueeze(2) * weights.unsqueeze(1)) / size.unsqueeze(1)
    flat = (idx.unsqueeze(2) * n + idx.unsqueeze(1)).view(batch, -1)
    lap = torch.zeros(batch, n * n, dtype=dtype, device=idx.device)
    lap.scatter_add_(1, flat, -pair.view(batch, -1))
    lap = lap.view(batch, n, n)
    lap.diagonal(dim1=1, dim2=2).add_(
        torch.zeros(batch, n, dtype=dtype, device=idx.device).scatter_add_(
            1, idx.flatten(1), weights.flatten(1)))
    return lap


def _conjugate_gradient(matvec, rhs, diag, max_iter, rtol):
    """Jacobi-preconditioned CG on a batch of symmetric positive systems."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    target = rtol * rhs.norm(dim=1, keepdim=True)
    tiny = torch.finfo(rhs.dtype).tiny
    for it in range(max_iter):
        Ap = matvec(p)
        pAp = (p * Ap).sum(dim=1, keepdim=True)
        step = rz / pAp.clamp(min=tiny)
        x = x + step * p
        r = r - step * Ap
        # One host sync every 10 steps keeps the GPU busy between checks.
        if it % 10 == 9 and bool((r.norm(dim=1, keepdim=True) <= target).all()):
            break
        z = r / diag
        rz_new = (r * z).sum(dim=1, keepdim=True)
        p = z + (rz_new / rz.clamp(min=tiny)) * p
        rz = rz_new
    return x


def _marginal_error(grad):
    return grad.abs().sum(dim=1)


def _lbfgs(fun, x, max_iter, tol, scale, memory=10, patience=20):
    """Batched L-BFGS maximization of a concave ``fun(x) -> (value, grad)``.

    ``scale`` sets the first step, ``scale * grad``, and the restarts.
    Stops on ``||grad||_1 <= tol`` or a stall: the value rose by less than
    ``1e-12 (1 + |value|)`` over the last ``patience`` iterations. Returns
    ``(x, n_iter)``.
    """
    value, grad = fun(x)
    s_hist, y_hist = [], []
    history = []
    done = _marginal_error(grad) <= tol
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is returned)
        # Two-loop recursion on the negated (convex) problem.
        q = -grad
        coefs = []
        for s, y in zip(reversed(s_hist), reversed(y_hist), strict=True):
            sy = (s * y).sum(dim=1, keepdim=True)
            # A zeroed pair (a frozen or curvature-free problem) is skipped.
            rho = torch.where(sy > 0, 1.0 / sy.clamp(min=1e-300), 0.0)
            c = rho * (s * q).sum(dim=1, keepdim=True)
            q = q - c * y
            coefs.append((rho, c))
        if s_hist:
            s, y = s_hist[-1], y_hist[-1]
            sy = (s * y).sum(dim=1, keepdim=True)
            yy = (y * y).sum(dim=1, keepdim=True)
            q = q * torch.where(sy > 0, sy / yy.clamp(min=1e-300), scale)
        else:
            q = q * scale
        for (s, y), (rho, c) in zip(zip(s_hist, y_hist, strict=True),
                                    reversed(coefs), strict=True):
            q = q + s * (c - rho * (y * q).sum(dim=1, keepdim=True))
        direction = -q
        slope = (grad * direction).sum(dim=1, keepdim=True)
        # A non-ascent direction (curvature lost at a kink): restart on the gradient.
        bad = slope <= 0
        direction = torch.where(bad, grad * scale, direction)
        slope = (grad * direction).sum(dim=1, keepdim=True)
        step = torch.ones_like(slope)
        for _ in range(30):
            new_x = x + step * direction
            new_value, new_grad = fun(new_x)
            ok = (new_value.unsqueeze(1) >= value.unsqueeze(1) + 1e-4 * step * slope)
            if bool(ok.all()):
                break
            step = torch.where(ok, step, 0.5 * step)
        # Finished problems of a batch stay frozen, so a batch returns what
        # separate solves would.
        ok = ok & torch.isfinite(new_value).unsqueeze(1) & ~done.unsqueeze(1)
        new_x = torch.where(ok, new_x, x)
        new_value = torch.where(ok.squeeze(1), new_value, value)
        new_grad = torch.where(ok, new_grad, grad)
        s, y = new_x - x, grad - new_grad
        curved = ((s * y).sum(dim=1, keepdim=True) > 1e-30).to(s.dtype)
        s_hist.append(s * curved)
        y_hist.append(y * curved)
        if len(s_hist) > memory:
            s_hist.pop(0)
            y_hist.pop(0)
        x, value, grad = new_x, new_value, new_grad
        err = _marginal_error(grad)
        history.append(value)
        if len(history) > patience:
            gained = value - history.pop(0)
            flat = gained <= 1e-12 * (1.0 + value.abs())
        else:
            flat = torch.zeros_like(err, dtype=torch.bool)
        # At a kink of the dual the error can wander for ever while the value
        # is settled to rounding: that is the stall. The error itself often
        # rises before it falls, so it cannot serve as the progress measure.
        done = done | (err <= tol) | flat
        if bool(done.all()):
            break
    return x, n_iter


def _newton_semi_dual(alpha, a, b, C, gamma, k, idx, max_iter, tol, patience,
                      skip=None, dense=False):
    """Semismooth Newton (Levenberg-Marquardt damped, Armijo line search).

    The generalized Hessian is ``-(1/gamma) L`` with ``L`` the graph Laplacian of
    :func:`_laplacian_matvec`; the damping ``rho = ||grad||_1`` makes the system
    positive definite far from the solution and vanishes near it, which keeps the
    fast local rate. Returns ``(alpha, n_iter, best_err)``, keeping the iterate
    with the smallest marginal error (the stall test compares against it).
    """
    value, grad, sel, t = semi_dual_objective(alpha, a, b, C, gamma, k, idx)
    err = _marginal_error(grad)
    best_alpha, best_err = alpha, err
    since_best = torch.zeros_like(err, dtype=torch.long)
    if skip is not None:
        since_best = torch.where(skip, patience, since_best)
    n_iter = 0
    n = alpha.shape[1]
    for n_iter in range(1, max_iter + 1):
        finished = (err <= tol) | (since_best >= patience)
        if bool(finished.all()):
            n_iter -= 1
            break
        active = t > 0
        if dense:
            # An exact solve: CG stalls on these ill-conditioned Laplacians.
            # The small fixed shift only pins the null directions (the shift
            # of each connected component, whose right-hand side vanishes
            # once the supports are right).
            lap = _laplacian_dense(n, sel, active, alpha.dtype)
            lap.diagonal(dim1=1, dim2=2).add_(1e-9)
            factor, _ = torch.linalg.cholesky_ex(lap)
            direction = torch.cholesky_solve((gamma * grad).unsqueeze(2),
                                             factor).squeeze(2)
        else:
            rho = (err.unsqueeze(1) / n).clamp(min=1e-14)
            diag = _laplacian_diagonal(alpha, sel, active) + rho

            def matvec(v, sel=sel, active=active, rho=rho):
                return _laplacian_matvec(v, sel, active) + rho * v

            direction = _conjugate_gradient(matvec, gamma * grad, diag,
                                            max_iter=min(4 * n, 500), rtol=1e-3)
        slope = (grad * direction).sum(dim=1)
        step = torch.ones_like(value)
        for _ in range(20):
            new_alpha = alpha + step.unsqueeze(1) * direction
            new_value, new_grad, new_sel, new_t = semi_dual_objective(
                new_alpha, a, b, C, gamma, k, idx)
            ok = new_value >= value + 1e-4 * step * slope
            if dense:
                # Near the optimum the value moves by less than its rounding
                # while the error still falls: that is progress too.
                ok = ok | ((new_value >= value - 1e-13 * (1.0 + value.abs()))
                           & (_marginal_error(new_grad) < 0.9 * err))
            if bool(ok.all()):
                break
            step = torch.where(ok, step, 0.5 * step)
        ok = ok & ~finished
        keep = ok.unsqueeze(1)
        alpha = torch.where(keep, new_alpha, alpha)
        value = torch.where(ok, new_value, value)
        grad = torch.where(keep, new_grad, grad)
        sel = torch.where(keep.unsqueeze(2), new_sel, sel)
        t = torch.where(keep.unsqueeze(2), new_t, t)
        err = _marginal_error(grad)
        improved = err < best_err * (1 - 1e-2)
        best_alpha = torch.where((err < best_err).unsqueeze(1), alpha, best_alpha)
        best_err = torch.minimum(err, best_err)
        since_best = torch.where(improved, 0, since_best + 1)
        # No ascent even at a 1e-6 step: the Newton model is wrong here (a
        # kink), and more steps would only repeat the failed search.
        since_best = torch.where(ok | finished, since_best, patience)
    return best_alpha, n_iter, best_err


def _beta_from_plan(alpha, C, idx, vals, gamma):
    """Column potentials from the optimality condition on the plan's support.

    On every positive entry ``alpha_i + beta_j - C_ij = gamma P_ij``; averaging it
    over the support gives the ``beta`` that pairs with ``alpha``.
    """
    active = (vals > 0).to(vals.dtype)
    picked_alpha = alpha.gather(1, idx.flatten(1)).view_as(vals)
    picked_cost = C.gather(1, idx)
    resid = gamma * vals - picked_alpha + picked_cost
    return (resid * active).sum(dim=1) / active.sum(dim=1).clamp(min=1.0)


# Stages of the continuation in gamma (multiples of the target gamma).
_CONTINUATION = (16.0, 4.0, 1.0)
# Up to this many rows the Newton system is factorized densely (O(n^3) but
# exact); beyond, Jacobi-preconditioned CG.
_DENSE_NEWTON_MAX_N = 4000


def _ascend(a, b, C, gamma, k, alpha, factors, max_iter, tol, patience,
            continuation):
    """L-BFGS over the stages ``gamma * factors``, then the Newton polish.

    With ``continuation`` the L-BFGS stages aim at 1e-4 and the Newton system
    is solved exactly (dense Cholesky, up to ``_DENSE_NEWTON_MAX_N`` rows);
    without, L-BFGS aims at 1e-3 and Newton uses CG with
    Levenberg-Marquardt damping. Returns ``(alpha, n_iter)``.
    """
    # L-BFGS brings every row into some column's support; Newton then needs
    # few steps. The Hessian is about L / gamma with L a Laplacian of O(1)
    # entries, while gradient entries are of the order of the masses: a first
    # step of gamma * n * grad moves the potentials on the scale of the costs.
    # At small gamma most columns hold one row and L-BFGS crawls; solving at
    # 16 gamma and 4 gamma first (smoother, larger supports) and warm-starting
    # makes the last stage short.
    switch = max(tol, 1e-3)
    target = max(tol, 1e-4) if continuation else switch
    it_lbfgs = 0
    for factor in factors:
        stage_gamma = gamma * factor

        def fun(x, stage_gamma=stage_gamma):
            value, grad, _, _ = semi_dual_objective(x, a, b, C, stage_gamma, k)
            return value, grad

        # An intermediate stage only prepares the next: half the budget at
        # most.
        budget = max_iter - it_lbfgs if factor == 1.0 else max_iter // 2
        alpha, used = _lbfgs(fun, alpha, max(budget, 1), target,
                             stage_gamma * a.shape[1], patience=patience)
        it_lbfgs += used
        if continuation and factor > 1.0 and bool(
                (_marginal_error(fun(alpha)[1]) > 10 * switch).all()):
            # Far from the marginals at a larger gamma: k binds there (and
            # most likely at gamma too), so the direct ascent takes over.
            return alpha, it_lbfgs
    # Newton only pays where L-BFGS got close; a problem that stalled above
    # the switch point sits on a kink where the Newton model is wrong.
    _, grad, _, _ = semi_dual_objective(alpha, a, b, C, gamma, k)
    dense = continuation and a.shape[1] <= _DENSE_NEWTON_MAX_N
    alpha, it_newton, _ = _newton_semi_dual(
        alpha, a, b, C, gamma, k, None, max_iter // 10 + 10, tol,
        patience=10 if dense else 5, skip=_marginal_error(grad) > switch,
        dense=dense)
    return alpha, it_lbfgs + it_newton


def solve_semi_dual(a, b, C, gamma, k, *, alpha0=None, max_iter=1000, tol=1e-10,
                    patience=10):
    """Maximize the sparsity-constrained semi-dual: L-BFGS then Newton polish.

    Parameters
    ----------
    a, b, C, gamma, k
        As in :func:`semi_dual_objective`.
    alpha0 : Tensor of shape (B, n), default=None
        Warm start (zeros by default).
    max_iter : int
        Budget of L-BFGS iterations; the Newton polish gets ``max_iter // 10 + 10``.
    tol : float
        Target marginal L1 error ``||a - P 1||_1``.
    patience : int
        Iterations without progress before the stall test stops a phase.

    Returns
    -------
    SolverResult
    """
    if alpha0 is not None:
        alpha, n_iter = _ascend(a, b, C, gamma, k, alpha0.clone(), (1.0,),
                                max_iter, tol, patience, continuation=False)
    else:
        # Each row starts level with its nearest column (a c-transform of
        # beta = 0), so every row is near the top of some column from step one.
        start = C.amin(dim=2)
        alpha, n_iter = _ascend(a, b, C, gamma, k, start, _CONTINUATION, max_iter,
                                tol, patience, continuation=True)
        _, grad, _, _ = semi_dual_objective(alpha, a, b, C, gamma, k)
        missed = _marginal_error(grad) > max(tol, 1e-3)
        if bool(missed.any()):
            # Where k binds, the continuation can stall on another kink than
            # the direct ascent, one whose supports admit no feasible plan:
            # there, also run the direct ascent and keep the smaller read-out
            # error.
            direct, it_direct = _ascend(a, b, C, gamma, k, start, (1.0,),
                                        max_iter, tol, patience,
                                        continuation=False)
            _, grad_d, _, _ = semi_dual_objective(direct, a, b, C, gamma, k)
            use = missed & (_marginal_error(grad_d) < _marginal_error(grad))
            alpha = torch.where(use.unsqueeze(1), direct, alpha)
            n_iter = n_iter + it_direct
    value, grad, idx, t = semi_dual_objective(alpha, a, b, C, gamma, k)
    vals = t * b.unsqueeze(1)
    beta = _beta_from_plan(alpha, C, idx, vals, gamma)
    n_iter = torch.full_like(value, n_iter, dtype=torch.long)
    return SolverResult(alpha, beta, idx, vals, value, n_iter,
                        _marginal_error(grad) <= tol)


def solve_dual(a, b, C, gamma, k, *, max_iter=1000, tol=1e-10, patience=10):
    """Maximize the sparsity-constrained dual in ``(alpha, beta)`` with L-BFGS.

    The dual is not polished by Newton; its read-out generally misses both
    marginals until convergence, which is why ``formulation="semi_dual"`` is the
    default and the repair step exists.

    Returns
    -------
    SolverResult
    """
    n = a.shape[1]

    def fun(x):
        value, ga, gb, _, _ = dual_objective(x[:, :n], x[:, n:], a, b, C, gamma, k)
        return value, torch.cat([ga, gb], dim=1)

    x0 = torch.zeros(a.shape[0], n + b.shape[1], dtype=a.dtype, device=a.device)
    x, n_iter = _lbfgs(fun, x0, max_iter, tol, gamma * (n + b.shape[1]),
                       patience=patience)
    alpha, beta = x[:, :n], x[:, n:]
    value, ga, gb, idx, vals = dual_objective(alpha, beta, a, b, C, gamma, k)
    err = _marginal_error(ga) + _marginal_error(gb)
    return SolverResult(alpha, beta, idx, vals, value,
                        torch.full_like(value, n_iter, dtype=torch.long), err <= tol)


def solve_on_support(a, b, C, gamma, idx, alpha0, *, max_iter=200, tol=1e-10):
    """Quadratically regularized OT restricted to the rows ``idx`` of each column.

    The repair problem: ``min <P, C> + (gamma/2)||P||^2`` over plans with the
    marginals ``a`` and ``b`` that vanish outside the given supports. Solved by
    semismooth Newton on its semi-dual (smooth and piecewise quadratic, so the
    Newton steps settle in finitely many iterations when a feasible plan exists).

    Returns
    -------
    alpha : Tensor of shape (B, n)
    vals : Tensor of shape (B, k, m)
        The repaired masses on ``idx`` (re-sorted as returned in ``idx_out``).
    idx_out : Tensor of shape (B, k, m)
    marginal_error : Tensor of shape (B,)
    n_iter : int
    """
    k = idx.shape[1]
    alpha, n_iter, _ = _newton_semi_dual(alpha0, a, b, C, gamma, k, idx, max_iter,
                                         tol, patience=10)
    _, grad, idx_out, t = semi_dual_objective(alpha, a, b, C, gamma, k, idx)
    return alpha, t * b.unsqueeze(1), idx_out, _marginal_error(grad), n_iter

