"""``sparsity_constrained_ot``: validation, device handling and the result record."""

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning

from skreg._device import resolve_device, to_numpy
from skreg.transport._degree import degree_capped_plan
from skreg.transport._solver import (
    SolverResult,
    _beta_from_plan,
    _cost_sample,
    _marginal_error,
    _objective_unit,
    _plan_errors,
    dual_objective,
    semi_dual_objective,
    solve_dual,
    solve_linear_on_support,
    solve_on_support,
    solve_semi_dual,
)

__all__ = ["SparseOTResult", "sparsity_constrained_ot"]


@dataclass
class SparseOTResult:
    """The outcome of :func:`sparsity_constrained_ot`.

    Arrays are NumPy when the inputs were NumPy and tensors (on the input's
    device) when they were tensors. With a batch dimension every field gains a
    leading axis ``B``. The fields are the constructor's parameters.

    Parameters
    ----------
    plan : array of shape (n, m)
        The transport plan; at most ``max_nz`` nonzeros per column.
    plan_sparse : scipy.sparse.coo_array, list of them, or torch sparse tensor
        The same plan in COO form (a list of ``coo_array`` for a NumPy batch).
    alpha, beta : arrays of shape (n,) and (m,)
        The best dual potentials found (``beta`` is recovered from the read-out
        plan for the semi-dual). After a repair they still certify
        ``dual_objective``; they are not the repaired problem's potentials.
    value : float or tensor
        ``<P, C> + (gamma/2) ||P||_F^2`` of the returned plan. For tensor input
        it is differentiable: its gradient with respect to ``C`` is the plan,
        with respect to ``a`` and ``b`` the potentials ``alpha`` and ``beta``
        (exact at convergence without repair), and with respect to a
        ``gamma`` tensor ``||P||_F^2 / 2`` (summed over a batch).
    cost : float or array
        ``<P, C>``.
    dual_objective : float or array
        The dual (or semi-dual) objective at the returned potentials: a lower
        bound on the optimal value of the sparsity-constrained problem.
    primal_objective : float or array
        Same as ``value`` (a float or array, never differentiable).
    duality_gap : float or array
        ``primal_objective - dual_objective``; an upper bound on how far the
        plan is from optimal when its marginals are exact.
    n_iter : int or array
        Solver iterations (L-BFGS plus Newton; the repair is not counted).
    converged : bool or array
        Whether the dual read-out met ``tol`` before any repair.
    marginal_error : float or array
        ``||P 1 - a||_1 + ||P^T 1 - b||_1`` of the returned plan (in units of
        mass; ``tol`` is relative to the total mass).
    readout_marginal_error : float or array
        The same for the plan read from the dual potentials, before repair.
    repaired : bool or array
        Whether the returned plan comes from the repair step (and has exact
        marginals up to ``tol``).
    binding : bool or array
        Whether some column would take more than ``max_nz`` rows at the
        returned potentials, i.e. whether the sparsity constraint is active.
    infeasible : bool or array
        Whether no plan with at most ``max_nz`` nonzeros per column has the
        marginals, proved either by counting (``max_nz * m`` nonzeros cannot
        cover the ``n`` rows with mass) or by the repair's mixed-integer
        program. False means only that no proof was found.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.transport import sparsity_constrained_ot
    >>> C = np.random.RandomState(0).rand(4, 4)[::-1]
    >>> res = sparsity_constrained_ot(np.full(4, 0.25), np.full(4, 0.25), C,
    ...                               max_nz=2, gamma=1.0)
    >>> bool(res.marginal_error < 1e-9), res.plan_sparse.nnz <= 8
    (True, True)
    """

    plan: Any
    plan_sparse: Any
    alpha: Any
    beta: Any
    value: Any
    cost: Any
    dual_objective: Any
    primal_objective: Any
    duality_gap: Any
    n_iter: Any
    converged: Any
    marginal_error: Any
    readout_marginal_error: Any
    repaired: Any
    binding: Any
    infeasible: Any


class _OptimalValue(torch.autograd.Function):
    """The optimal value with its envelope-theorem gradients.

    At an optimum the derivative of ``min_P <P, C> + Omega(P)`` with respect to
    ``C`` is the plan itself, with respect to the masses it is the
    potentials, and with respect to ``gamma`` it is ``||P||_F^2 / 2``, so no
    differentiation through the solver's iterations is needed.
    """

    @staticmethod
    def forward(ctx, C, a, b, gamma, value, plan, alpha, beta):
        ctx.save_for_backward(plan, alpha, beta)
        ctx.gamma_like = gamma if isinstance(gamma, torch.Tensor) else None
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        plan, alpha, beta = ctx.saved_tensors
        g = grad_output.view(-1, *([1] * (plan.dim() - grad_output.dim())))
        g_vec = grad_output.view(-1, *([1] * (alpha.dim() - grad_output.dim())))
        # gamma is shared by the batch: its gradient sums over the problems.
        g_gamma = None
        if ctx.gamma_like is not None:
            g_gamma = ((g * plan.square()).sum() / 2).to(ctx.gamma_like)
        return (g * plan, g_vec * alpha, g_vec * beta, g_gamma, None, None, None,
                None)


def _check_masses(name, mass, size, batch, dtype, device):
    if mass is None or (not isinstance(mass, torch.Tensor)
                        and np.asarray(mass).size == 0):
        # Uniform masses, as POT reads None or [].
        mass = np.full(size, 1.0 / size)
    if not isinstance(mass, torch.Tensor):
        mass = np.ascontiguousarray(mass, dtype=np.float64)
    mass = torch.as_tensor(mass).to(device=device, dtype=dtype).detach()
    if mass.dim() == 1:
        mass = mass.unsqueeze(0).expand(batch, -1)
    if mass.dim() != 2 or mass.shape != (batch, size):
        raise ValueError(
            f"{name} must have shape ({size},) or ({batch}, {size}) to match C, "
            f"got {tuple(mass.shape)}."
        )
    if not bool(torch.isfinite(mass).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if bool((mass < 0).any()):
        raise ValueError(f"{name} must be nonnegative; it has negative entries.")
    if bool((mass.sum(dim=1) <= 0).any()):
        raise ValueError(f"{name} must have a positive total mass.")
    return mass


def _validate(a, b, C, max_nz, gamma, formulation, max_iter, tol, device,
              repair=True):
    if formulation not in ("semi_dual", "dual"):
        raise ValueError(
            f"formulation must be 'semi_dual' or 'dual', got {formulation!r}."
        )
    if not (isinstance(repair, (bool, np.bool_))
            or (isinstance(repair, str) and repair == "full")):
        raise ValueError(f"repair must be True, False or 'full', got {repair!r}.")
    if isinstance(max_nz, bool) or not isinstance(max_nz, numbers.Integral):
        raise TypeError(f"max_nz must be an integer, got {type(max_nz).__name__}.")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a real number, got {type(gamma).__name__}.")
    if not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma!r}.")
    if gamma < np.finfo(np.float64).tiny:
        # A subnormal gamma overflows on division (k = 1 gave NaN plans).
        raise ValueError(
            f"gamma must be at least {np.finfo(np.float64).tiny:.1e} (a normal "
            f"float64), got {gamma!r}.")
    if (isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral)
            or max_iter < 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if (isinstance(tol, bool) or not isinstance(tol, numbers.Real)
            or not 0 < tol < np.inf):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}.")

    is_torch = isinstance(C, torch.Tensor)
    if not is_torch:
        for name, mass in (("a", a), ("b", b)):
            if isinstance(mass, torch.Tensor) and mass.requires_grad:
                raise TypeError(
                    f"{name} requires grad but C is a NumPy array: pass C as a "
                    "torch tensor to differentiate the optimal value.")
    if device is None:
        device = C.device if is_torch else torch.device("cpu")
    device = resolve_device(device)
    if is_torch:
        C_t = C.detach()
        if C_t.is_complex():
            raise TypeError(f"C must be real, got dtype {C_t.dtype}.")
        # Floating input keeps its precision (the solve is in float64), half
        # precision becomes float32: a plan in float16 would miss the
        # marginals by about 1e-3 from its rounding alone.
        dtype = C_t.dtype if C_t.dtype in (torch.float32, torch.float64) else (
            torch.float32 if C_t.is_floating_point() else torch.float64)
        C_t = C_t.to(device=device, dtype=dtype)
    else:
        # Reversed or sliced views have strides torch cannot share.
        C_np = np.ascontiguousarray(C)
        if (not np.issubdtype(C_np.dtype, np.number)
                or np.issubdtype(C_np.dtype, np.complexfloating)):
            raise TypeError(f"C must be a real numeric array, got dtype {C_np.dtype}.")
        dtype = torch.float32 if C_np.dtype in (np.float32, np.float16) else (
            torch.float64)
        C_t = torch.as_tensor(C_np, dtype=dtype, device=device)
    if C_t.dim() not in (2, 3):
        raise ValueError(
            f"C must be a 2-D cost matrix (n, m) or a 3-D batch (B, n, m), got "
            f"{C_t.dim()} dimension(s)."
        )
    batched = C_t.dim() == 3
    if not batched:
        C_t = C_t.unsqueeze(0)
    batch, n, m = C_t.shape
    if batch == 0 or n == 0 or m == 0:
        shape = tuple(C_t.shape if batched else C_t.shape[1:])
        raise ValueError(f"C must be non-empty, got shape {shape}.")
    if not bool(torch.isfinite(C_t).all()):
        raise ValueError("C contains NaN or infinite values.")
    if not 1 <= max_nz <= n:
        raise ValueError(
            f"max_nz must be between 1 and the number of source points n={n}, "
            f"got {max_nz}."
        )
    a_t = _check_masses("a", a, n, batch, dtype, device)
    b_t = _check_masses("b", b, m, batch, dtype, device)
    total_a, total_b = a_t.sum(dim=1), b_t.sum(dim=1)
    if not bool(torch.allclose(total_a, total_b, rtol=1e-6, atol=0.0)):
        raise ValueError(
            "a and b must have the same total mass; got sums "
            f"{to_numpy(total_a).tolist()} and {to_numpy(total_b).tolist()}."
        )
    return a_t, b_t, C_t, batched, is_torch, device


def _dense_plan(idx, vals, n):
    batch, _, m = idx.shape
    plan = torch.zeros(batch, n, m, dtype=vals.dtype, device=vals.device)
    return plan.scatter_(1, idx, vals)


def _cost(idx, vals, C):
    """``<P, C>`` per problem for the plans ``vals`` on the rows ``idx``."""
    return (vals * C.gather(1, idx)).sum(dim=(1, 2))


# The exact-OT fallback of the repair runs on the CPU: POT's network simplex
# on a dense n x m plan (2.5 s at n = m = 3000), or from 1e5 entries on the
# restricted LP of _candidate_ot (10-13 s at n = m = 10,000, 2-D clouds), so
# with repair=True it is skipped beyond this many entries (the repair then
# reports the infeasible support); repair="full" runs it at any size.
_EXACT_OT_MAX_ENTRIES = 10**7


# Up to this many entries, where k binds, the repair tries every support and
# keeps the cheapest plan; beyond, the first that works (each try is a
# Newton solve, and the exact-OT support a network simplex: at n = m = 1000
# trying them all took 0.2-0.5 s per binding row, 3.3x POT's speed instead of
# 6.0x on one, for gaps down from 6.3e-2 to 6.0e-2 at best). On small
# problems the cheapest plan came from any of the three (n = 200, d = 10,
# k = 2: 16.63 from the exact-OT support against 16.83 from the averaged one;
# n = 12-40: the averaged support up to 10% cheaper than the top-k one).
_TRY_ALL_SUPPORTS_ENTRIES = 10**5
# Where k binds, the capped support (:func:`_capped_support`) is tried when
# the best plan of the other supports is above the dual objective by more
# than this, relative to 1 + |dual|. On the binding rows of the benchmark
# at n = 200-1000 those gaps are either below 1e-5 relative (small gamma,
# or k = 10) or above 1e-2 (k = 2, gamma = 0.1 median(C) n).
_CAPPED_MIN_GAP = 1e-3


def _emd(a, b, C):
    """POT's network simplex on one problem: the exact plan and row potentials."""
    import ot

    plan, log = ot.emd(to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64),
                       to_numpy(C).astype(np.float64), numItermax=10**7, log=True)
    return plan, log["u"]


def _solve_one_sparse(a, b, C, gamma, tol):
    """The semi-dual for ``k = 1``, maximized exactly by the network simplex.

    With one row per column, ``maxOmega`` is ``max_i z_i - 1/2``, so the
    semi-dual is ``<alpha, a> - sum_j b_j max_i (alpha_i - C_ij) + (gamma/2)
    sum_j b_j^2``: the exact OT dual in ``alpha`` (its c-transform in
    ``beta``) plus a constant. The exact row potentials of ``ot.emd``
    maximize it; L-BFGS on this polyhedral function stalls below the
    maximum (measured: 2.6e-3 below POT's value on a 12 x 16 problem). The
    read-out is the top-1 row of each column at those potentials.
    """
    exact = [_emd(a[i], b[i], C[i]) for i in range(C.shape[0])]
    alpha = torch.stack([torch.as_tensor(u) for _, u in exact]).to(C.device, C.dtype)
    value, grad, idx, t = semi_dual_objective(alpha, a, b, C, gamma, 1)
    vals = t * b.unsqueeze(1)
    beta = _beta_from_plan(alpha, C, idx, vals, gamma)
    n_iter = torch.zeros_like(value, dtype=torch.long)
    return SolverResult(alpha, beta, idx, vals, value, n_iter,
                        _marginal_error(grad) <= tol, [p for p, _ in exact])


# Rows per column offered to the exact OT plan restricted to the candidates
# (_candidate_ot): each column's best at the dual's potentials.
_CANDIDATE_ROWS = 8
# From this many entries on, the exact-OT support comes from that restricted
# plan; below, POT's network simplex on the whole problem is cheap (on the
# 84 small problems of bench_transport.py --hard-binding the restricted plan
# gave a dearer repaired plan on 2 and a cheaper one on 1).
_CANDIDATE_OT_MIN_ENTRIES = 10**5


def _entry_lp(a, b, rows, cols, costs, upper=None):
    """``min <P, C>`` over plans with the marginals on the given entries.

    One problem: ``a`` (n,), ``b`` (m,) NumPy masses; the entries
    ``(rows, cols)`` with their ``costs``, and optional upper bounds
    ``upper`` (one per entry). Solved by HiGHS (interior point, then
    crossover to a vertex). Returns the ``(rows, cols, values)`` of the
    positive entries, or None where the entries hold no such plan or the
    LP fails.
    """
    from scipy.optimize import linprog

    n, m = a.size, b.size
    entries = np.arange(cols.size)
    constraints = sp.csr_array(
        (np.ones(2 * cols.size), (np.concatenate([rows, n + cols]),
                                  np.concatenate([entries, entries]))),
        shape=(n + m, cols.size))
    bounds = ((0, None) if upper is None
              else np.stack([np.zeros_like(upper), upper], axis=1))
    lp = linprog(costs, A_eq=constraints, b_eq=np.concatenate([a, b]),
                 bounds=bounds, method="highs-ipm")
    if lp.status != 0:
        return None
    positive = lp.x > 0
    return rows[positive], cols[positive], lp.x[positive]


def _candidate_ot(a, b, C, alpha, which):
    """Exact OT restricted to each column's best rows at ``alpha``: its support.

    The linear program ``min <P, C>`` over plans with the marginals whose
    column ``j`` uses only its ``_CANDIDATE_ROWS`` rows of largest
    ``alpha_i - C_ij``, solved by HiGHS (:func:`_entry_lp`; a vertex, whose
    support is a forest: at most ``n + m - 1`` entries). Near
    the dual optimum those rows hold the plan's mass, and the LP is far
    smaller than the full problem: at ``n = m = 3000`` 0.6-1.2 s against 4.8 s
    for POT's network simplex on all ``n m`` entries. Problems whose
    candidates hold no plan (:func:`_lacks_plan`) or whose LP fails get
    ``None``. Returns, per problem of ``which``, the ``(rows, cols, values)``
    of the plan's positive entries.
    """
    batch, n, m = C.shape
    cand = (alpha.unsqueeze(2) - C).topk(min(_CANDIDATE_ROWS, n), dim=1).indices
    costs = to_numpy(C.gather(1, cand)).reshape(batch, -1)
    empty = ~to_numpy(which).astype(bool)
    holds = ~_lacks_plan(a, b, cand, None, 0.0) & ~empty
    cand_np, a_np, b_np = to_numpy(cand), to_numpy(a), to_numpy(b)
    cols = np.broadcast_to(np.arange(m), cand_np.shape[1:]).ravel()
    out = [None] * batch
    for i in np.nonzero(holds)[0]:
        out[i] = _entry_lp(a_np[i], b_np[i], cand_np[i].ravel(), cols, costs[i])
    return out


def _best_entries(alpha, beta, C, k):
    """Each column's and each row's ``max(_CANDIDATE_ROWS, 2 k)`` entries of
    largest ``alpha_i + beta_j - C_ij`` (``(B, n, m)`` bool)."""
    n, m = C.shape[1:]
    depth = max(_CANDIDATE_ROWS, 2 * k)
    scores = alpha.unsqueeze(2) + beta.unsqueeze(1) - C
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen.scatter_(1, scores.topk(min(depth, n), dim=1).indices, True)
    chosen.scatter_(2, scores.topk(min(depth, m), dim=2).indices, True)
    return chosen


def _capped_support(a, b, C, alpha, beta, k, which):
    """Supports for the regime where the quadratic term spreads the plan.

    Where ``gamma`` is large against the cost differences, the regularized
    plan wants every column spread as evenly as it can, and the evenest
    column with at most ``k`` nonzeros puts ``b_j / k`` on each. So this
    support is the one of the cheapest plan whose entries stay below that
    spread: ``min <P, C>`` over plans with the marginals and ``P_ij <= b_j /
    k`` (:func:`_entry_lp`), on the entries among each column's and each
    row's ``max(_CANDIDATE_ROWS, 2 k)`` best at the dual's ``(alpha, beta)``.
    For uniform masses with ``n = m`` its vertex is a ``k``-regular
    bipartite graph; in general a column may hold up to ``k - 1`` capped
    entries and a few fractional ones, and its ``k`` heaviest are kept.
    Measured at n = m = 1000, 2-D clouds, k = 2, gamma = 0.1 median(C) n:
    the repaired plan's gap to the dual 6.0e-2 (exact-OT support) -> 1.7e-4;
    in 10-D 0.41 -> 0.061. Where ``gamma`` is small it is a poor support
    (same problems at 0.1 median(C): gap 3e-6 -> 3e-3), hence only tried
    where the other supports leave a large gap (``_CAPPED_MIN_GAP``).

    Returns ``idx`` (``(B, k, m)``), ``mask`` (which of those entries the
    plan uses) and ``ok`` (``(B,)``: the LP had a solution; only the
    problems ``which`` are solved).
    """
    batch, n, m = C.shape
    chosen = _best_entries(alpha, beta, C, k)
    a_np, b_np = to_numpy(a), to_numpy(b)
    idx = np.zeros((batch, k, m), dtype=np.int64)
    mask = np.zeros((batch, k, m), dtype=bool)
    ok = to_numpy(which).astype(bool)
    for i in np.nonzero(ok)[0]:
        rows, cols = torch.nonzero(chosen[i], as_tuple=True)
        costs = to_numpy(C[i, rows, cols])
        rows, cols = to_numpy(rows), to_numpy(cols)
        found = _entry_lp(a_np[i], b_np[i], rows, cols, costs, upper=b_np[i, cols] / k)
        if found is None:
            ok[i] = False
            continue
        # Each column's k heaviest entries.
        rows, cols, values = found
        order = np.lexsort((-values, cols))
        rows, cols = rows[order], cols[order]
        slot = np.arange(cols.size) - np.searchsorted(cols, cols)
        keep = slot < k
        idx[i, slot[keep], cols[keep]] = rows[keep]
        mask[i, slot[keep], cols[keep]] = True
    return tuple(torch.as_tensor(x, device=C.device) for x in (idx, mask, ok))


def _exact_ot_support(a, b, C, idx, which, plans=None, alpha=None):
    """Supports that admit a feasible plan: an exact OT plan's, topped up.

    For each problem, the rows of each column in an exact (unregularized)
    optimal plan, completed with the column's best rows of ``idx`` up to
    ``k``. The plan is, in this order: ``plans[i]`` when ``plans`` is given
    (one dense plan per problem); the exact plan restricted to the best rows
    at ``alpha`` (:func:`_candidate_ot`) when ``alpha`` is given and those
    rows hold a plan; else POT's network simplex (``ot.emd``) on the whole
    problem. Where a column of the exact plan has more than ``k`` nonzeros,
    network-simplex pivots move it to a plan with at most ``k``
    (:func:`skreg.transport._degree.degree_capped_plan`; measured on a
    64 x 67 uniform-mass problem, k = 2: the repaired plan 4.3% of
    ``1 + |dual|`` above the dual, where no support had held a plan). The
    support holds a feasible plan by construction; ``ok`` is false for the
    problems where the pivots found none, and for those ``which`` leaves out
    (their ``idx`` is returned unchanged).

    Returns
    -------
    idx : Tensor of shape (B, k, m)
    ok : bool Tensor of shape (B,)
    """
    batch, k, m = idx.shape
    idx_np = idx.cpu().numpy()
    out = idx_np.copy()
    ok = to_numpy(which).astype(bool)
    restricted = ([None] * batch if plans is not None or alpha is None
                  else _candidate_ot(a, b, C, alpha, which))
    for i in np.nonzero(ok)[0]:
        if restricted[i] is not None:
            rows, cols, values = restricted[i]
        else:
            exact = plans[i] if plans is not None else _emd(a[i], b[i], C[i])[0]
            rows, cols = np.nonzero(exact > 0)
            values = exact[rows, cols]
        counts = np.bincount(cols, minlength=m)
        if counts.max() > k:
            # Pivots to a plan with at most k rows per column, where found.
            capped = degree_capped_plan(rows, cols, values,
                                        to_numpy(C[i]).astype(np.float64), k)
            if capped is None:
                ok[i] = False
                continue
            rows, cols, _ = capped
        out[i] = _completed(rows, cols, idx_np[i])
    return (torch.as_tensor(out, device=idx.device),
            torch.as_tensor(ok, device=idx.device))


def _completed(rows, cols, fill):
    """The entries ``(rows, cols)`` (at most k per column) as ``(k, m)`` rows.

    Each column lists its given rows first, then its rows of ``fill``
    (``(k, m)``, distinct per column) not among them, k in all: a support
    that holds whatever plan the given entries hold, with room to spread.
    """
    k, m = fill.shape
    counts = np.bincount(cols, minlength=m)
    out = fill.copy()
    order = np.argsort(cols, kind="stable")
    rows, cols = rows[order], cols[order]
    slot = np.arange(cols.size) - np.searchsorted(cols, cols)
    out[slot, cols] = rows
    fresh = ~np.isin(fill * m + np.arange(m), rows * m + cols)
    rank = np.cumsum(fresh, axis=0) - 1 + counts
    take = fresh & (rank < k)
    out[rank[take], np.nonzero(take)[1]] = fill[take]
    return out


# Where k binds and no other support held a plan, the repair solves the
# mixed-integer program of _milp_support on problems of at most
# _MILP_MAX_ENTRIES entries; with repair="full", over every entry up to
# _MILP_MAX_ENTRIES_FULL entries and, beyond, over the dual's best entries
# where they are at most that many. Within at most _MILP_NODE_LIMIT
# branch-and-bound nodes (a node limit, not a time limit, so that the result
# does not depend on the machine) and the relative optimality gap
# _MILP_GAP; only where a spanning tree fits (n + m - 1 <= k m). A plan's
# support holds a spanning forest of it with one tree per set of rows and
# columns of equal mass, so with masses in general position every plan
# needs n + m - 1 nonzeros; where k m is below that, a plan needs such
# coincidences, and the program found none (on 150 random problems of 2-60
# rows and columns, uniform or random masses, with no size limit: none
# found, up to 34 s per problem).
# Measured on the 40 problems of bench_transport.py --hard-binding (16-24 x
# 6-8, uneven masses) where no other support held a plan: HiGHS found a
# plan on all 16 where a tree fits (at its root node), in 0.03-2.6 s (median
# 0.35 s); on the 24 others, with a 10 s limit each, it found 14 infeasible
# and gave up on 10. With HiGHS's default gap (1e-4), the same repaired
# plans, but 1.0 s against 0.28 s (median over the 40, run on each). The
# program's time grows fast and unevenly with its size: on the 150 random
# problems, allowed up to 1024 entries, it found plans on 2 more (47 x 11
# and 27 x 35, 517 and 945 entries, 0.4 s and 2.4 s); on a random-mass
# 44 x 23 problem (1012 entries) 6 s. With "full" (there over every entry,
# elsewhere over the dual's best 495-1023), it found plans on 5 of the 7
# random-mass problems of 23-112 rows and columns that the other supports
# missed and where a tree fits, in 6-20 s per call, and gave up on 2 after
# 12-17 s.
_MILP_MAX_ENTRIES = 256
_MILP_MAX_ENTRIES_FULL = 1024
_MILP_NODE_LIMIT = 10
_MILP_GAP = 1e-2


def _fewest_nonzeros(a, b):
    """A lower bound on the nonzeros of any plan with the marginals, ``(B,)``.

    A plan's support holds a spanning forest with one tree per set of rows
    and columns of equal total mass. With masses in general position there
    is one tree: ``n + m - 1`` nonzeros. With uniform masses (the default of
    the estimators) ``r`` rows match ``c`` columns whenever ``r m = c n``,
    which allows up to ``gcd(n, m)`` trees: ``n + m - gcd(n, m)`` (measured:
    12 x 10 clouds at ``k = 2`` and ``gamma = 1e-10 median(C)``, where no
    other support held a plan, got none before the mixed-integer program
    ran there, and one after). Other coincidences are not looked for.
    """
    n, m = a.shape[1], b.shape[1]

    def uniform(x):
        return (x.amax(dim=1) - x.amin(dim=1)) <= 1e-12 * x.amax(dim=1)

    even = uniform(a) & uniform(b)
    return torch.where(even, n + m - math.gcd(n, m), n + m - 1)


def _milp_support(a, b, C, fill, which, entries=None):
    """Supports from a plan with at most k nonzeros per column, where one exists.

    The support problem itself: ``min <P, C>`` over plans with the marginals
    and at most ``k`` nonzeros per column, a mixed-integer program (one
    binary per entry, ``P_ij <= min(a_i, b_j) z_ij``, ``sum_i z_ij <= k``)
    solved by HiGHS (:func:`scipy.optimize.milp`) within ``_MILP_NODE_LIMIT``
    nodes, over every entry or, with ``entries`` (``(B, n, m)`` bool), over
    those alone. Its plan's rows are completed to k per column with those of
    ``fill`` (:func:`_completed`). The linear cost picks a support, not the
    regularized plan: the repair's solve on the completed support spreads
    the mass.

    Returns ``idx`` (``(B, k, m)``), ``ok`` (a plan was found; only the
    problems ``which`` are solved), ``none`` (over every entry, HiGHS
    found the program infeasible: no plan with at most k nonzeros per column
    has the marginals), both ``(B,)``, and the program's plan on ``idx``
    (``(B, k, m)`` values, zero where no plan was found).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    batch, k, m = fill.shape
    n = C.shape[1]
    fill_np = to_numpy(fill)
    out = fill_np.copy()
    values = np.zeros(fill_np.shape)
    ok = to_numpy(which).astype(bool)
    none = np.zeros(batch, dtype=bool)
    for i in np.nonzero(ok)[0]:
        rows, cols = np.nonzero(np.ones((n, m), dtype=bool) if entries is None
                                else to_numpy(entries[i]))
        size = rows.size
        a_i, b_i = to_numpy(a[i]), to_numpy(b[i])
        # Variables: the plan's entries, then their binaries.
        own = np.arange(size)
        margins = np.concatenate([a_i, b_i])
        constraints = [
            LinearConstraint(sp.csr_array(
                (np.ones(2 * size), (np.concatenate([rows, n + cols]),
                                     np.concatenate([own, own]))),
                shape=(n + m, 2 * size)), margins, margins),
            LinearConstraint(sp.csr_array(
                (np.concatenate([np.ones(size), -np.minimum(a_i[rows], b_i[cols])]),
                 (np.concatenate([own, own]), np.concatenate([own, size + own]))),
                shape=(size, 2 * size)), -np.inf, 0.0),
            LinearConstraint(sp.csr_array((np.ones(size), (cols, size + own)),
                                          shape=(m, 2 * size)), 0, k)]
        found = milp(
            np.concatenate([to_numpy(C[i])[rows, cols], np.zeros(size)]),
            integrality=np.repeat([0, 1], size), constraints=constraints,
            bounds=Bounds(0, np.concatenate([np.full(size, np.inf), np.ones(size)])),
            options={"node_limit": _MILP_NODE_LIMIT, "mip_rel_gap": _MILP_GAP})
        if found.x is None:
            ok[i], none[i] = False, entries is None and found.status == 2
            continue
        mass = np.zeros((n, m))
        mass[rows, cols] = found.x[:size]
        top = np.argsort(-mass, axis=0, kind="stable")[:k]
        held = np.take_along_axis(mass, top, axis=0) > 0
        out[i] = _completed(top[held], np.nonzero(held)[1], fill_np[i])
        values[i] = np.take_along_axis(mass, out[i], axis=0)
    device = fill.device
    return (torch.as_tensor(out, device=device), torch.as_tensor(ok, device=device),
            torch.as_tensor(none, device=device),
            torch.as_tensor(values, dtype=C.dtype, device=device))


# Masses are scaled to integers summing to about this for the max-flow test.
_FLOW_SCALE = 2 ** 30


def _lacks_plan(a, b, idx, mask, tol):
    """Problems whose support certainly holds no plan within ``tol`` of the marginals.

    The support (rows ``idx``, ``(B, k, m)``, where ``mask`` is true) holds
    a plan with the marginals exactly when the maximum flow from the rows
    (capacities ``a``) to the columns (capacities ``b``) along it carries
    all the mass. Any nonnegative plan on it misses the marginals by at
    least the flow's deficit in L1 (trim it to the capacities: what is left
    is a flow). The flow is computed in integers (SciPy's Dinic, on the
    host, one graph for the whole batch) with the supplies rounded up and
    the demands down, which can only raise it, and a problem is flagged
    only where the deficit exceeds that rounding (``m`` units) and ``tol``:
    a flagged support is infeasible, never a feasible one misjudged.
    Returns a ``(B,)`` bool NumPy array.
    """
    from scipy.sparse.csgraph import maximum_flow

    a_np, b_np = to_numpy(a), to_numpy(b)
    idx_np = to_numpy(idx)
    batch, k, m = idx_np.shape
    n = a_np.shape[1]
    keep = (np.ones((batch, k, m), dtype=bool) if mask is None
            else to_numpy(mask).astype(bool))
    total = np.maximum(a_np.sum(axis=1), b_np.sum(axis=1))
    scale = _FLOW_SCALE / np.where(total > 0, total, 1.0)
    supply = np.ceil(a_np * scale[:, None]).astype(np.int64)
    demand = np.floor(b_np * scale[:, None]).astype(np.int64)
    # Node 0 is the source, the last the sink; problem i's rows and columns
    # follow 1 + i (n + m).
    base = 1 + (n + m) * np.arange(batch)
    rows = base[:, None] + np.arange(n)
    cols = base[:, None] + n + np.arange(m)
    problem, slot, col = np.nonzero(keep)
    sink = 1 + (n + m) * batch
    tails = np.concatenate([np.zeros(rows.size, dtype=np.int64),
                            rows[problem, idx_np[problem, slot, col]], cols.ravel()])
    heads = np.concatenate([rows.ravel(), cols[problem, col],
                            np.full(cols.size, sink)])
    caps = np.concatenate([supply.ravel(), demand[problem, col], demand.ravel()])
    graph = sp.csr_array((caps.astype(np.int32), (tails, heads)),
                         shape=(sink + 1, sink + 1))
    flow = maximum_flow(graph, 0, sink).flow.tocsc()[:, [sink]].tocoo()
    arrived = np.zeros(batch, dtype=np.int64)
    into = flow.data > 0
    np.add.at(arrived, (flow.row[into] - 1) // (n + m), flow.data[into])
    return (total > 0) & (demand.sum(axis=1) - arrived > m + tol * scale)


def _repair(res, a, b, C, gamma, err, tol, binding, full=False):
    """Re-solve on supports of at most k rows per column; keep the best plan.

    Up to five supports, in turn: each column's top-k rows at the
    dual's potentials; where k binds and the solver kept its last iterates,
    each column's k heaviest rows in the average of their read-out plans
    (:func:`_solver._averaged_support`); and, only for the problems neither
    of those repaired, an exact OT plan's rows completed to k
    (:func:`_exact_ot_support`; beyond ``_EXACT_OT_MAX_ENTRIES`` entries
    only with ``full``); then, where k binds and the best plan so far
    leaves a gap to the dual above ``_CAPPED_MIN_GAP`` (relative), the
    capped-spread support of :func:`_capped_support` (same size limit);
    and, where k binds and no support so far held a plan, on problems of at
    most ``_MILP_MAX_ENTRIES`` entries (with ``full``, see
    ``_MILP_MAX_ENTRIES_FULL``) where a spanning tree fits in k rows per
    column, the support of a plan with at most k nonzeros per column from a
    mixed-integer program (:func:`_milp_support`), which may also find that
    none exists.
    Where k does not bind, the first plan with
    the marginals is the optimum and is returned. Where k binds (``binding``,
    ``(B,)``) on problems of at most ``_TRY_ALL_SUPPORTS_ENTRIES`` entries,
    every support is tried and each problem keeps the plan of lowest primal
    objective among those with the marginals
    (measured on the 84 small problems of ``bench_transport.py
    --hard-binding`` with full BFGS: the averaged support gave the lower
    primal on 25 of the 28 problems where both it and the top-k support had
    a feasible plan).

    Except where every support is tried, the top-k support is first
    narrowed to the entries the dual's plan already uses: Newton, then
    linear solves, there. Where k does not bind, that plan is kept where the
    duality gap certifies it (primal within ``tol (1 + |dual|)`` of the dual
    objective), and otherwise only as a candidate; where k binds, a plan
    with the marginals there is kept, as the first plan found is elsewhere.
    On a GPU at n = 10,000 (2-D clouds, gamma = 0.1 median(C)) Newton on
    the whole top-k support crossed a few new kinks per step (the active set
    grew by about 40 entries a step, each step cut to 1/64) for 25-30 steps
    without lowering its error, 0.6-0.75 s, before the solves on the entries
    it gave mass repaired the plan. Narrowed first: k = 10 (not binding),
    repair 0.97 s -> 0.32 s, the same plan (n = 30,000: the row 15.7-18.0 s
    -> 14.5 s); d = 10, k = 2 (binding), repair 0.6-0.75 s -> 0.12 s, a plan
    whose primal is 1e-9 higher (measured on the CPU rows: at most 1e-9
    relative higher, the marginals met either way).

    A base support that a maximum flow shows to hold no plan with the
    marginals (:func:`_lacks_plan`) gets no Newton attempt: those attempts
    only ran until the infeasibility certificate or their step window
    stopped them (measured, same plans: n = 3000, d = 2, k = 2,
    gamma = 0.1 median(C): repair 2.0 s -> 0.6 s; n = 1000, d = 10, k = 2,
    0.1 median(C) n: 0.83 s -> 0.42 s).

    Where the solve on a base support misses the marginals, it is re-solved
    on the rows that solve gave mass: near a degenerate optimum (an entry
    exactly on the projection threshold) Newton lets that entry flip in and
    out at every step, and the positive support pins it out (measured at
    n = 3000: 6.8e-7, then 7.0e-13 in one step). Where that Newton solve
    still crawls (many such entries: n = 10,000 in 2-D), the positive
    support is solved by linear solves that drop negative entries
    (:func:`solve_linear_on_support`).
    Returns the plans (rows ``(B, k, m)`` and values, the read-out's where
    nothing was repaired), which problems were repaired, and which have no
    plan with at most k nonzeros per column (found by the mixed-integer
    program), each ``(B,)``.
    """
    plan_idx, plan_vals = res.idx.clone(), res.vals.clone()
    repaired = torch.zeros_like(err, dtype=torch.bool)
    best = torch.full_like(err, torch.inf)
    broken = err > tol
    # Where k does not bind, the first plan found is the optimum.
    try_all = binding & (C.shape[1] * C.shape[2] <= _TRY_ALL_SUPPORTS_ENTRIES)
    bases = ["top_k"] + (["averaged"] if res.averaged_support is not None else [])
    fill = res.idx
    unit = _objective_unit(C)
    infeasible = torch.zeros_like(repaired)
    for base in bases + ["exact_ot", "capped", "milp"]:
        todo = broken & ~(repaired & ~try_all)
        if base == "capped":
            # Only where k binds and the plan found leaves a large gap.
            bound = res.dual_objective
            wide = best - bound > _CAPPED_MIN_GAP * (unit + bound.abs())
            todo = broken & binding & wide
        if base == "milp":
            # Only where k binds, no support held a plan, a spanning forest
            # fits in k rows per column, and the program is small.
            n, m = C.shape[1:]
            todo = (broken & binding & ~repaired
                    & (_fewest_nonzeros(a, b) <= res.idx.shape[1] * m))
            if not bool(todo.any()) or (n * m > _MILP_MAX_ENTRIES and not full):
                break
            limit = _MILP_MAX_ENTRIES_FULL if full else _MILP_MAX_ENTRIES
        if not bool(todo.any()):
            continue
        idx, mask = res.idx, None
        if base in ("exact_ot", "capped") and not full and (
                C.shape[1] * C.shape[2] > _EXACT_OT_MAX_ENTRIES):
            break
        if base == "capped":
            idx, mask, todo = _capped_support(a, b, C, res.alpha, res.beta,
                                              idx.shape[1], todo)
        if base == "milp":
            entries = None
            if C.shape[1] * C.shape[2] > limit:
                # With full: the dual's best entries, where few enough.
                entries = _best_entries(res.alpha, res.beta, C, idx.shape[1])
                todo = todo & (entries.sum(dim=(1, 2)) <= limit)
            idx, todo, none, milp_vals = _milp_support(a, b, C, fill, todo, entries)
            infeasible = infeasible | none
            milp_idx = idx
        if base == "exact_ot":
            # Completed with the averaged plan's heaviest rows where there is
            # one: the top-k rows of a kink point tie, and which of them fill
            # the support depended on the path (n = 200, d = 10, k = 2,
            # gamma = 0.1 median(C) n: primal 16.726 -> 16.655; on the 84
            # hard-binding problems cheaper on 2, the same on the rest).
            restrict = C.shape[1] * C.shape[2] >= _CANDIDATE_OT_MIN_ENTRIES
            idx, todo = _exact_ot_support(a, b, C, fill, todo, plans=res.exact_plans,
                                          alpha=res.alpha if restrict else None)
        elif base == "averaged":
            # Only where the solver kept the trace a separate solve keeps.
            todo = todo & res.averaged
        # Only the problems still to repair are solved.
        rows = torch.nonzero(todo).squeeze(1)
        if rows.numel() == 0:
            continue
        idx, alpha = idx[rows], res.alpha[rows]
        if base == "averaged":
            idx, mask = res.averaged_support(rows)
            fill = fill.clone()
            fill[rows] = idx
        if base == "capped":
            mask = mask[rows]
        if base not in ("exact_ot", "milp"):
            # No Newton attempts on a support that holds no plan (the
            # exact-OT and MILP supports hold one by construction).
            holds = ~torch.as_tensor(_lacks_plan(a[rows], b[rows], idx, mask, tol),
                                     device=rows.device)
            if not bool(holds.all()):
                rows, idx, alpha = rows[holds], idx[holds], alpha[holds]
                mask = None if mask is None else mask[holds]
                if rows.numel() == 0:
                    continue
        sub = (a[rows], b[rows], C[rows])
        left = torch.ones_like(rows, dtype=torch.bool)
        # Except where every support is tried, the top-k support is first
        # narrowed to the entries the dual's plan uses (attempt 0). Where k
        # binds, a plan there with the marginals is kept, as the first plan
        # found always was; where it does not, only if the duality gap
        # certifies it. Attempts 1-3 are the whole support, then its solve's
        # positive entries, then linear solves on those.
        first = torch.zeros_like(left) if base != "top_k" else ~try_all[rows]
        start, whole_idx, whole_mask = alpha, idx, mask
        if bool(first.any()):
            _, _, idx, t = semi_dual_objective(alpha, *sub, gamma, idx.shape[1], idx,
                                               mask)
            mask = t > 0
        for attempt in range(4):
            go = (left & first) if attempt == 0 else left
            if attempt == 1:
                idx, mask, alpha = whole_idx, whole_mask, start
            if not bool(go.any()):
                continue
            part = torch.nonzero(go).squeeze(1)
            piece = tuple(x[part] for x in sub)
            where = rows[part]
            if attempt < 3:
                # The whole base support holds a plan (by construction, or
                # the flow test): there Newton gets the L-BFGS fallback.
                new_alpha, vals, new_idx, _, _ = solve_on_support(
                    *piece, gamma, idx[part], alpha[part],
                    mask=None if mask is None else mask[part], tol=tol,
                    holds=torch.ones_like(part, dtype=torch.bool) if attempt == 1
                    else None)
            else:
                new_alpha, vals, _ = solve_linear_on_support(
                    *piece, gamma, idx[part], mask[part], alpha[part])
                new_idx = idx[part]
            fixed = _plan_errors(new_idx, vals, *piece[:2]) <= tol
            if attempt == 0 and not bool(fixed.all()):
                # Newton on the used entries can stop short of the tolerance
                # where entries sit on the projection threshold; the linear
                # solves on its positive entries settle those.
                lin_alpha, lin_vals, lin_err = solve_linear_on_support(
                    *piece, gamma, new_idx, vals > 0, new_alpha)
                lin = (~fixed & (lin_err <= tol)).view(-1, 1, 1)
                new_alpha = torch.where(lin.view(-1, 1), lin_alpha, new_alpha)
                vals = torch.where(lin, lin_vals, vals)
                fixed = _plan_errors(new_idx, vals, *piece[:2]) <= tol
            primal = _primal(new_idx, vals, piece[2], gamma)
            # Done where the plan has the marginals; for the used entries'
            # plan, only where k binds or the duality gap certifies it.
            done = fixed
            if attempt == 0:
                bound = res.dual_objective[where]
                done = fixed & ((primal - bound <= tol * (unit[where] + bound.abs()))
                                | binding[where])
            better = fixed & (primal < best[where])
            take = better.view(-1, 1, 1)
            plan_idx[where] = torch.where(take, new_idx, plan_idx[where])
            plan_vals[where] = torch.where(take, vals, plan_vals[where])
            best[where] = torch.where(better, primal, best[where])
            repaired[where] = repaired[where] | fixed
            left[part] = left[part] & ~done
            if not bool(left.any()):
                break
            if attempt > 0:
                # Then the entries that solve gave mass.
                alpha, idx = alpha.clone(), idx.clone()
                mask = (torch.zeros_like(idx, dtype=torch.bool) if mask is None
                        else mask.clone())
                alpha[part], idx[part], mask[part] = new_alpha, new_idx, vals > 0
        if base == "milp":
            # Where the solves on the program's support stall (gamma tiny
            # against the costs: a nearly linear problem, measured on 12 x 10
            # clouds at k = 2 and gamma = 1e-10 median(C)), the program's own
            # plan still has the marginals and at most k nonzeros per column.
            stuck = rows[~repaired[rows]]
            fixed = _plan_errors(milp_idx[stuck], milp_vals[stuck], a[stuck],
                                 b[stuck]) <= tol
            stuck = stuck[fixed]
            plan_idx[stuck], plan_vals[stuck] = milp_idx[stuck], milp_vals[stuck]
            best[stuck] = _primal(milp_idx[stuck], milp_vals[stuck], C[stuck], gamma)
            repaired[stuck] = True
    return plan_idx, plan_vals, repaired, infeasible


def _primal(idx, vals, C, gamma):
    """``<P, C> + (gamma / 2) ||P||^2`` per problem (plans as in ``_plan_errors``)."""
    return _cost(idx, vals, C) + 0.5 * gamma * (vals * vals).sum(dim=(1, 2))


def _binding(alpha, beta, a, b, C, gamma, k, formulation):
    """Whether some column's (k+1)-th entry would enter the plan."""
    n = C.shape[1]
    if k >= n:
        return torch.zeros(C.shape[0], dtype=torch.bool, device=C.device)
    if formulation == "semi_dual":
        _, _, idx, t = semi_dual_objective(alpha, a, b, C, gamma, k + 1)
        return (t[:, k, :] > 0).any(dim=1)
    _, _, _, idx, vals = dual_objective(alpha, beta, a, b, C, gamma, k + 1)
    return (vals[:, k, :] > 0).any(dim=1)


def sparsity_constrained_ot(a, b, C, max_nz, gamma, *, formulation="semi_dual",
                            max_iter=1000, tol=1e-9, repair=True, device=None):
    r"""Optimal transport with at most ``max_nz`` nonzeros in each plan column.

    Solves

    .. math::
        \min_{P \in U(a, b),\ \|P_{:, j}\|_0 \le k} \langle P, C\rangle
        + \frac{\gamma}{2} \|P\|_F^2

    through its (semi-)dual, reads the plan out of the potentials, and, when the
    read-out misses the marginals, re-solves the problem restricted to the
    chosen supports (``repair``).

    Parameters
    ----------
    a : array-like or tensor of shape (n,) or (B, n), or None
        Source masses (nonnegative); None or empty: uniform, ``1/n`` each.
    b : array-like or tensor of shape (m,) or (B, m), or None
        Target masses (nonnegative, same total as ``a`` up to ``1e-6``
        relative, and rescaled to it); None or empty: uniform, ``1/m`` each.
    C : array-like or tensor of shape (n, m) or (B, n, m)
        Cost matrix (real, any sign: a constant added to it changes the
        potentials ``alpha`` and the objectives by that constant and no
        plan); a leading batch dimension solves ``B`` problems at once.
    max_nz : int
        ``k``, the largest number of nonzeros per column, in ``[1, n]`` (a
        0-d integer array or tensor is read as its value).
        ``k = 1`` approaches unregularized OT as ``gamma -> 0``; ``k = n`` is
        quadratically regularized OT.
    gamma : float
        Weight of the quadratic term, as POT's ``reg`` (a 0-d array or
        tensor, such as ``0.1 * C.median()``, is read as its value). The
        potentials and costs are of the order of ``C`` while plan entries are
        of the order of ``1/n``, so the regularization matters when ``gamma``
        is of the order of ``n`` times the cost spread; ``0.1 * median(C)`` is
        nearly unregularized at ``n = 1000``. A ``ValueError`` where float64
        cannot resolve the plans: ``eps median(C - min C) / (gamma mean_j
        b_j)`` above 1e-2 (except ``max_nz=1`` up to ``n m = 1e7``, solved
        exactly whatever ``gamma``), where the scores ``(alpha - C_ij) /
        (gamma b_j)`` would overflow, or ``gamma`` subnormal.
    formulation : {"semi_dual", "dual"}, default="semi_dual"
        ``"semi_dual"`` optimizes ``alpha`` only and gets the ``b``-marginal
        exactly; ``"dual"`` optimizes ``(alpha, beta)`` by L-BFGS alone
        (along the same continuation in ``gamma``, without the working set,
        the slack stages or the Newton polish).
    max_iter : int, default=1000
        L-BFGS iteration budget of the last continuation stage (see Notes;
        the preparatory stages stop at ``min(max_iter, 400)``, and where
        ``max_nz`` binds on more than 256 rows, the last stage's three
        smoothed runs at ``max_iter // 16``, ``// 16`` and ``// 8``); the
        Newton polish and the repair have their own, ``max_iter // 10 + 10``
        and 200.
    tol : float, default=1e-9
        Target marginal L1 error, relative to the total mass (``sum(a)``);
        for float32 input at least ``100 eps`` (1.2e-5). The solver stops
        when it is met or when it stalls (see Notes), never on the objective
        change alone.
    repair : bool or "full", default=True
        When the read-out misses ``tol``, solve the quadratically regularized
        problem restricted to supports of at most ``k`` rows per column, in
        turn: each column's top-``k`` rows at the dual potentials; where
        ``k`` binds, the ``k`` heaviest rows of the averaged plan of the
        solver's last iterates; then the rows of an exact OT plan completed
        by the best rows up to ``k``, which holds a feasible plan whenever no
        column of the exact plan has more than ``k`` nonzeros. That exact
        plan is POT's ``ot.emd`` below ``n m = 1e5`` entries and, above, the
        exact plan restricted to each column's 8 best rows (a linear program
        solved by HiGHS; ``ot.emd`` where those rows hold no plan); both run
        on the CPU. Where ``k`` binds and the best of those plans is above the
        dual objective by more than 1e-3 relative (large ``gamma``, which
        wants every column spread), one more: the support of the cheapest
        plan whose entries stay below ``b_j / k``, the evenest spread ``k``
        entries allow (an LP on each column's and row's best entries); the
        cheapest plan is kept. Where ``k`` binds and none of those holds a
        plan, on problems of at most ``n m = 256`` entries where a spanning
        forest fits in ``k`` rows per column (``n + m - 1 <= k m``, or ``n + m
        - gcd(n, m) <= k m`` for uniform masses): the support of the cheapest
        plan with at most ``k`` nonzeros per column, from a mixed-integer
        program (HiGHS, within 10 branch-and-bound nodes), which may instead
        find that no such plan exists (the warning then says so); where the
        solves on that support stall (a tiny ``gamma``), the program's own
        plan is returned.
        A support that holds no plan is detected at once (a maximum flow,
        then a weak-duality bound), and ``repaired`` says which problems got
        a plan with the marginals. With ``True`` the LP-based supports are
        tried only up to ``n m = 1e7`` entries; ``"full"`` tries them at any
        size (measured on the CPU at ``n = m = 10,000``, 2-D clouds, ``k =
        2``, ``gamma = 0.1 median(C)``: 119-141 s against 113.5 s, for exact
        marginals where ``True`` returns the read-out's 1.2e-2), and the
        mixed-integer program on up to 1024 entries (beyond ``n m = 1024``,
        on the dual's best entries; seconds to tens of seconds). ``False``
        returns the read-out.
    device : str, torch.device or None, default=None
        Where to compute; ``None`` computes where ``C`` lives (the CPU for
        NumPy input). Results come back on the input's device, in its
        precision: float32 input is solved in float64 (a float32 dual
        resolves plan entries only to ``eps |C| / (gamma b_j)``: at
        ``n = 1000`` and ``gamma = 0.1 median(C)`` it missed the marginals
        by 1e-2) and the results are returned in float32; float16 and
        bfloat16 input is returned in float32 too, integer input in float64.

    Returns
    -------
    result : SparseOTResult
        The plan, potentials, objectives, gap and diagnostics.

    Warns
    -----
    ConvergenceWarning
        When the returned plan misses the marginals by more than ``tol``.

    Notes
    -----
    The semi-dual is :math:`\max_\alpha \langle\alpha, a\rangle - \sum_j b_j
    \max\Omega_j((\alpha - C_{:, j}))` whose maximizer in column ``j`` is
    :math:`P_k((\alpha - C_{:, j}) / (\gamma b_j))`: the Euclidean projection
    onto the simplex of the ``k`` largest entries. Ties between the ``k``-th
    and ``(k+1)``-th entries are broken by the selection (NumPy's sorts on
    the CPU with one torch thread, :func:`torch.topk` otherwise); the repair
    then treats the chosen rows as given. The dual is :math:`\max_{\alpha, \beta}
    \langle\alpha, a\rangle + \langle\beta, b\rangle - \sum_j \frac{1}{2\gamma}
    \sum_{\text{top-}k} [\alpha + \beta_j - C_{:, j}]_+^2`.

    The semi-dual is maximized by L-BFGS along a continuation in ``gamma``:
    from ``gamma_0 = 0.1 median(C) / mean(b)`` (a smooth problem whose plan
    spreads over tens of rows per column) down to ``gamma`` by factors of 4,
    each stage warm-started from the previous one and solved with a slack
    sparsity (``max(2k, k + 16)`` rows per column, so the stages above
    ``gamma`` do not bind), then a last stage with ``k`` itself. Where ``k``
    binds (the slack plan uses more rows in some column), that stage runs
    full BFGS up to 256 rows; beyond, it maximizes three smoothed semi-duals
    in turn (each column's ``maxOmega`` replaced by ``mu log sum_q
    exp(g_q / mu)`` over the supports of its top ``k - 1`` rows with each of
    the next three; the smoothed semi-dual is below the exact one by at most
    ``mu log(3) gamma sum_j b_j^2``), ``mu`` falling from ``1e-4`` to
    ``1e-6`` of the value's scale, for ``max_iter // 16``, ``max_iter // 16``
    and ``max_iter // 8`` iterations: on the exact dual L-BFGS crawls along
    the kink. From
    ``n = m = 1000`` on, the first stage starts from the potentials of a
    random subsample of 250 to 1000 points (the row potentials follow from
    its column potentials by the row-wise optimality condition). Every
    evaluation touches only a working set of candidate rows per column (the
    rows with the largest ``alpha_i - C_ij`` at its last refresh), in
    ``O(k m)`` instead of ``O(n m)``; a drift bound certifies that no other
    row can enter the top-``k`` or receive mass, and the columns where it
    fails are refreshed first, so the values are exact. A semismooth Newton
    method then polishes the potentials: its generalized Hessian is a graph
    Laplacian over the plan's support, factorized as a sparse bipartite
    system (SciPy's SuperLU, on the host; conjugate gradients where the
    support has more than 3 entries per row), or, on a GPU up to 16,384 rows,
    densely, with a constant shift of ``1e-9`` that pins
    its null directions. L-BFGS keeps its curvature pairs from one stage to
    the next. A phase stops when the marginal error reaches
    ``tol`` or stalls: for L-BFGS, the value rose by less than ``1e-12``
    relative over 10 iterations; for Newton, the best error fell by less
    than 1% over 10 iterations (a rise of the value counts as progress), or
    not tenfold over 30, or three steps in a row were cut below 1/32 without
    halving it (a kink), or the line search found no ascent.

    The solver works at unit mass: ``(s a, s b, s C, gamma)`` is ``s^2``
    times ``(a, b, C, gamma)``, with ``s`` the power of two nearest the total
    mass (exact: a problem scaled by a power of two is solved as the
    original), and its relative tests on the value are floored at the
    costs' median magnitude where that is below 1. So ``(s a, s b, t C,
    gamma t / s)`` gives ``s`` times the plan and ``t`` times the potentials
    of ``(a, b, C, gamma)`` at any scale.

    With ``k = 1`` the semi-dual is the exact OT dual plus ``(gamma/2)
    sum_j b_j^2``, a polyhedral function on which L-BFGS stalls; up to
    ``n m = 1e7`` entries its maximizer is taken from POT's network simplex
    (``ot.emd``'s row potentials) instead, and ``n_iter`` is 0.

    When the constraint binds, the maximum sits on a kink of the dual and no
    ``k``-sparse read-out has exact marginals; ``repair`` then returns a
    feasible sparse plan and ``duality_gap`` bounds its suboptimality.

    Reference: T. Liu, J. Puigcerver, M. Blondel, "Sparsity-Constrained Optimal
    Transport", ICLR 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.transport import sparsity_constrained_ot
    >>> rng = np.random.RandomState(0)
    >>> C = rng.rand(5, 5)
    >>> a = b = np.full(5, 0.2)
    >>> res = sparsity_constrained_ot(a, b, C, max_nz=2, gamma=1.0)
    >>> bool((np.count_nonzero(res.plan, axis=0) <= 2).all())
    True
    >>> bool(res.marginal_error < 1e-8)
    True
    """
    C_in, gamma_in = C, gamma
    # gamma = 0.1 * C.median() is a 0-d tensor: read scalars as their value.
    max_nz, gamma = (
        x.item() if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 0 else x
        for x in (max_nz, gamma))
    a_t, b_t, C_t, batched, is_torch, device = _validate(
        a, b, C, max_nz, gamma, formulation, max_iter, tol, device, repair)
    # float32 input is solved in float64 and returned in float32, which
    # cannot carry errors below its own resolution: the target is that.
    tol = max(tol, 100 * torch.finfo(C_t.dtype).eps)
    a64, b64, C64 = (x.to(torch.float64) for x in (a_t, b_t, C_t))
    k = int(max_nz)
    if bool((a64 > 0).all()) and bool((b64 > 0).all()):
        fields = _solve_in_units(_in_units(a64, b64, C64, k, gamma, formulation),
                                 formulation, max_iter, tol, repair)
    else:
        fields = _solve_without_massless(a64, b64, C64, k, gamma, formulation,
                                         max_iter, tol, repair)
    fields = {name: value.to(C_t.dtype) if value.is_floating_point() else value
              for name, value in fields.items()}
    return _package(fields, fields["primal_objective"], a, b, C_in, gamma_in, a_t, b_t,
                    batched, is_torch)


def _in_units(a, b, C, k, gamma, formulation):
    """The problems in their solving units, checked: a dict for
    :func:`_solve_in_units`.

    Masses in units of :func:`_mass_scale`, costs in units of
    :func:`_cost_unit` and shifted to a zero minimum (:func:`_shifted`),
    ``gamma`` in each problem's units; raises (:func:`_check_resolution`)
    before any solve.
    """
    # Totals equal up to the validation's 1e-6 (masses normalized in float32,
    # say) are made equal, as POT's emd does: with unequal totals the
    # semi-dual has no maximum (its gradient keeps a constant part), and a
    # difference of 1.5e-8 left plans 0.45 off the marginals at k = 1.
    b = b * (a.sum(dim=1) / b.sum(dim=1)).unsqueeze(1)
    mass = _mass_scale(a)
    unit = _cost_unit(C, mass, float(gamma))
    C = C / unit.view(-1, 1, 1)
    low = C.amin(dim=(1, 2))
    C = C - low.view(-1, 1, 1)
    a, b = a / mass.unsqueeze(1), b / mass.unsqueeze(1)
    # gamma in each problem's units: gamma itself wherever unit is mass.
    gammas = [math.ldexp(float(gamma), int(e)) for e in
              (torch.log2(mass) - torch.log2(unit)).tolist()]
    _check_resolution(a, b, C, k, torch.tensor(gammas, dtype=torch.float64,
                                               device=C.device),
                      float(gamma), formulation)
    return {"a": a, "b": b, "C": C, "k": k, "mass": mass, "unit": unit, "low": low,
            "gammas": gammas}


def _solve_in_units(problem, formulation, max_iter, tol, repair, stacklevel=4):
    """Solve the problems of :func:`_in_units` (every mass positive); the
    fields in the caller's units, float64. ``stacklevel`` points a
    convergence warning at the caller of :func:`sparsity_constrained_ot`."""
    a, b, C, gammas = problem["a"], problem["b"], problem["C"], problem["gammas"]
    # Problems in the same units are solved together (the whole batch, unless
    # some costs are extreme), so a batch still returns its looped solves.
    groups = {}
    for i, g in enumerate(gammas):
        groups.setdefault(g, []).append(i)
    parts = []
    for g, rows in groups.items():
        pick = slice(None) if len(groups) == 1 else torch.tensor(rows, device=C.device)
        part, _ = _solve(a[pick], b[pick], C[pick], problem["k"], g, formulation,
                         max_iter, tol, repair, stacklevel)
        parts.append(part)
    fields = parts[0]
    if len(groups) > 1:
        back = torch.argsort(torch.tensor(sum(groups.values(), []), device=C.device))
        fields = {name: torch.cat([part[name] for part in parts])[back]
                  for name in fields}
    fields = _shifted(fields, problem["low"], a)
    return _rescaled(fields, problem["mass"], problem["unit"])


def _solve_without_massless(a, b, C, k, gamma, formulation, max_iter, tol, repair):
    """Drop massless rows and columns, solve, and put them back.

    A massless row or column carries nothing in any plan but slows the solver
    (its optimal potential is minus infinity), so each problem is solved
    without them, from its scaling on (sums, units, the costs' minimum), so
    that its result is, to the last bit, that of the problem given without
    them (where k binds, a difference in rounding alone can change the
    plan). A removed entry's potential is then the c-transform of the
    others, which keeps the pair dual feasible.
    """
    kept = [(torch.nonzero(a[i] > 0).squeeze(1), torch.nonzero(b[i] > 0).squeeze(1))
            for i in range(C.shape[0])]
    # Every problem is checked before any is solved.
    problems = [_in_units(a[i:i + 1, rows], b[i:i + 1, cols],
                          C[i][rows][:, cols].unsqueeze(0), min(k, rows.numel()),
                          gamma, formulation)
                for i, (rows, cols) in enumerate(kept)]
    outs = []
    for i, ((rows, cols), problem) in enumerate(zip(kept, problems, strict=True)):
        fields = _solve_in_units(problem, formulation, max_iter, tol, repair,
                                 stacklevel=5)
        plan = torch.zeros_like(C[i:i + 1])
        plan[0, rows.unsqueeze(1), cols.unsqueeze(0)] = fields["plan"][0]
        fields["plan"] = plan
        # Only the removed entries are filled, the columns' from the rows
        # with mass, then the rows' from every column (all finite by then).
        alpha, beta = torch.empty_like(a[i]), torch.empty_like(b[i])
        alpha[rows], beta[cols] = fields["alpha"][0], fields["beta"][0]
        missing = b[i] <= 0
        beta[missing] = (C[i][rows][:, missing] - alpha[rows].unsqueeze(1)).amin(dim=0)
        missing = a[i] <= 0
        alpha[missing] = (C[i][missing] - beta.unsqueeze(0)).amin(dim=1)
        fields["alpha"], fields["beta"] = alpha.unsqueeze(0), beta.unsqueeze(0)
        outs.append(fields)
    return {name: torch.cat([o[name] for o in outs]) for name in outs[0]}


# The coarsest resolution of a plan entry, relative to its column's mass,
# that the iterative solvers accept (see _check_resolution).
_MAX_RESOLUTION = 1e-2


def _check_resolution(a, b, C, k, gamma, user_gamma, formulation):
    """Raise where float64 cannot hold or resolve the plans of so small a ``gamma``.

    A column's plan is ``b_j`` times the simplex projection of the scores
    ``(alpha - C[:, j]) / (gamma b_j)``. Two limits (``C`` here has its
    minimum at 0; ``gamma`` is each problem's, ``(B,)``, in the units of
    ``C``; the messages name the caller's ``user_gamma``):

    - the scores must not overflow: ``max C / (gamma min_j b_j)`` finite
      (costs ``1e300`` with ``gamma = 1e-300``, or a column of mass
      ``1e-300`` with ``gamma = 1e-10``, had made every field NaN);
    - the iterations need the typical score resolved: float64 resolves the
      plan entries of a typical column only to ``eps median(C) / (gamma
      mean_j b_j)`` of its mass. Beyond ``_MAX_RESOLUTION`` they cannot meet
      the marginals (measured on 12 x 10 clouds at k = 2: gamma = 1e-20
      median(C) ended 0.63 off them, 1e-300 median(C) 0.33 off after 5526
      iterations and 3.6 s). The median and the mean, not the extremes: a
      single large cost (a forbidden pair) or a nearly massless column
      limits nothing (a column of mass 1e-20 of the total was solved to
      2e-10 at unit ``gamma``). The exact solve of ``k = 1`` does not depend
      on ``gamma`` (a single nonzero per column makes ``||P||^2`` a
      constant) and is exempt from this one.
    """
    n, m = C.shape[1:]
    lightest = torch.where(b > 0, b, torch.inf).amin(dim=1)
    if not bool(torch.isfinite(C.amax(dim=(1, 2)) / (gamma * lightest)).all()):
        raise ValueError(
            f"gamma={user_gamma!r} is too small for these costs and masses: the "
            "scores (alpha - C_ij) / (gamma b_j) overflow float64; raise gamma "
            "(with max_nz=1 it does not change the plan).")
    if (formulation == "semi_dual" and k == 1
            and n * m <= _EXACT_OT_MAX_ENTRIES):
        return
    typical = _cost_sample(C).median(dim=1).values
    mean_mass = b.sum(dim=1) / (b > 0).sum(dim=1)
    resolution = torch.finfo(torch.float64).eps * typical / (gamma * mean_mass)
    worst = int(resolution.argmax())
    if float(resolution[worst]) > _MAX_RESOLUTION:
        raise ValueError(
            f"gamma={user_gamma!r} is too small for these costs in float64: plan "
            f"entries would be resolved only to {float(resolution[worst]):.1e} of "
            "a column's mass (eps median(C - min C) / (gamma mean_j b_j)). Use "
            f"gamma >= {user_gamma * float(resolution[worst]) / _MAX_RESOLUTION:.2e}"
            ", or max_nz=1 (solved exactly, whatever gamma).")


def _mass_scale(a):
    """Each problem's mass scale: the power of two nearest its total mass.

    The problem with masses ``a, b``, costs ``C`` and weight ``gamma`` is
    ``s^2`` times the one with masses ``a / s, b / s`` and costs ``C / s``
    (same ``gamma``): its plan is ``s`` times, its potentials ``s`` times.
    The solver's tests are in units of mass (marginal errors, stage
    tolerances), so it solves at unit mass: at masses of total 1e-6 it
    stopped its stages at once (every error below their 1e-3), 54-87%
    below the dual of the same problem at unit mass (60 x 40 and 200 x 200
    2-D clouds). A power of two makes the
    scaling exact (a problem scaled by one is solved as the original), and
    the scale is each problem's own (``gamma`` is shared by the batch), so a
    batch still returns its looped solves. Returns ``(B,)``.
    """
    return 2.0 ** torch.round(torch.log2(a.sum(dim=1)))


# Costs are solved in units of the mass scale (:func:`_mass_scale`) while
# their spread is within this power of two of it; beyond, in units of the
# spread itself (see :func:`_cost_unit`).
_COST_RANGE = 32
# ... and gamma is kept within this power of two of those units.
_GAMMA_RANGE = 512


def _cost_unit(C, mass, gamma):
    """Each problem's cost unit, a power of two: ``mass``, unless that is extreme.

    The problem ``(a, b, C, gamma)`` is ``(a / s, b / s, C / u, gamma s / u)``
    in units of mass ``s`` and of cost ``u`` (its plan ``s`` times, its
    potentials ``u`` times, its objectives ``s u`` times). The solver's
    tests and safeguards hold absolute constants (curvature pairs with
    ``s'y <= 1e-30`` are dropped; POT's and HiGHS's tolerances), fit for costs
    of order 1, so costs whose spread is beyond ``2^32`` times the mass scale
    either way are solved in units of their spread; below, ``u = s`` as
    before. Measured on a 12 x 10 problem (``k = 3``): costs of ``2^-600``
    gave a plan 15% dearer than at unit cost (curvature pairs dropped), costs
    ``2^-1000`` times the masses' total underflowed to zero (``cost`` 0), and
    ``2^1030`` times it overflowed (every field NaN). Where ``gamma`` dwarfs
    even those costs, ``u`` is raised until ``gamma s / u`` is at most
    ``2^512``, so it stays finite. Returns ``(B,)``.
    """
    # Half the spread: the whole can overflow (costs from -1e308 to 1e308).
    half = C / 2
    spread = half.amax(dim=(1, 2)) - half.amin(dim=(1, 2))
    exponent = torch.floor(torch.log2(spread))
    scale = torch.log2(mass)
    extreme = (spread > 0) & ((exponent + 1 - scale).abs() > _COST_RANGE)
    exponent = torch.maximum(exponent, torch.floor(math.log2(gamma) + scale)
                             - _GAMMA_RANGE)
    return torch.where(extreme, 2.0 ** exponent.clamp(-1074, 1023), mass)


def _shifted(fields, low, a):
    """The fields of the problem with costs ``C - low`` moved back to ``C``.

    Each problem is solved with its smallest cost at zero: a constant added
    to the costs changes no plan (the masses are fixed), only the potentials
    (``alpha`` by the constant) and the objectives (by the constant times the
    mass). The solver's tests, its gamma path and the repair's heuristics are
    then free of the costs' level; before, a shift of the costs changed the
    plans where k binds (``C + 5`` on a 30 x 20 problem: another plan, 2e-4
    cheaper), and POT's network simplex, which the repair and ``k = 1`` call,
    finds a problem whose costs are all negative infeasible and returned a
    wrong plan (8 x 8, costs in [-5, -4], ``k = 1``: a gap of 3e-2 instead of
    1e-15).
    """
    out = dict(fields)
    out["alpha"] = fields["alpha"] + low.unsqueeze(1)
    out["dual_objective"] = fields["dual_objective"] + low * a.sum(dim=1)
    carried = low * fields["plan"].sum(dim=(1, 2))
    out["cost"] = fields["cost"] + carried
    out["primal_objective"] = fields["primal_objective"] + carried
    out["duality_gap"] = out["primal_objective"] - out["dual_objective"]
    return out


def _rescaled(fields, mass, unit):
    """The fields of the problem in units of ``mass`` and ``unit`` scaled back.

    See :func:`_mass_scale` and :func:`_cost_unit`.
    """
    out = dict(fields)
    out["plan"] = fields["plan"] * mass.view(-1, 1, 1)
    for name in ("marginal_error", "readout_marginal_error"):
        out[name] = fields[name] * mass
    for name in ("alpha", "beta"):
        out[name] = fields[name] * unit.unsqueeze(1)
    for name in ("cost", "dual_objective", "primal_objective", "duality_gap"):
        out[name] = fields[name] * (mass * unit)
    return out


def _solve(a_t, b_t, C_t, k, gamma, formulation, max_iter, tol, repair, stacklevel):
    tol_eff = max(tol, 100 * torch.finfo(C_t.dtype).eps)
    # tol is relative to the total mass (near 1 here, see _mass_scale): each
    # problem's error limit, and the solver's (at least as strict).
    total = a_t.sum(dim=1)
    limit = tol_eff * total
    tol_abs = tol_eff * min(1.0, float(total.min()))
    n = C_t.shape[1]
    # On the CPU, inference mode skips autograd's per-operation bookkeeping,
    # which no_grad keeps (the solver runs hundreds of small operations per
    # iteration). A GPU keeps no_grad alone: its rounds replay as CUDA graphs,
    # which skip the per-operation dispatch anyway, and were validated so.
    quiet = torch.inference_mode if C_t.device.type == "cpu" else torch.no_grad
    with quiet():
        if (formulation == "semi_dual" and k == 1
                and C_t.shape[1] * C_t.shape[2] <= _EXACT_OT_MAX_ENTRIES):
            res = _solve_one_sparse(a_t, b_t, C_t, gamma, tol_abs)
        elif formulation == "semi_dual":
            res = solve_semi_dual(a_t, b_t, C_t, gamma, k, max_iter=max_iter,
                                  tol=tol_abs)
        else:
            res = solve_dual(a_t, b_t, C_t, gamma, k, max_iter=max_iter, tol=tol_abs)
        idx, vals = res.idx, res.vals
        readout_err = _plan_errors(idx, vals, a_t, b_t)
        repaired = torch.zeros_like(readout_err, dtype=torch.bool)
        infeasible = torch.zeros_like(repaired)
        binding = _binding(res.alpha, res.beta, a_t, b_t, C_t, gamma, k, formulation)
        if repair and bool((readout_err > limit).any()):
            # The potentials stay those of the best dual: they certify the
            # lower bound, while the repaired plan gives the upper bound.
            idx, vals, repaired, infeasible = _repair(
                res, a_t, b_t, C_t, gamma, readout_err, tol_abs, binding,
                full=repair == "full")
    # What is returned is made of ordinary tensors (inference tensors can be
    # neither saved for backward nor changed in place outside inference mode).
    with torch.no_grad():
        res.alpha, res.beta, res.dual_objective, res.n_iter, res.converged = (
            x.clone() for x in (res.alpha, res.beta, res.dual_objective, res.n_iter,
                                res.converged))
        alpha, beta = res.alpha, res.beta
        # Every row with mass needs a nonzero, and there are k m at most.
        infeasible = infeasible | (k * C_t.shape[2] < n)
        readout_err, repaired, binding, infeasible = (
            x.clone() for x in (readout_err, repaired, binding, infeasible))
        err = _plan_errors(idx, vals, a_t, b_t)
        cost = _cost(idx, vals, C_t)
        primal = _primal(idx, vals, C_t, gamma)
        plan = _dense_plan(idx, vals, n)

    if bool((err > limit).any()):
        n, m = C_t.shape[1:]
        if k * m < n:
            # Every row with mass needs a nonzero, and there are k m at most.
            why = (f"no plan has these marginals: max_nz * m = {k * m} nonzeros "
                   f"cannot cover the n = {n} rows with mass; raise max_nz.")
        elif repair and bool((infeasible | (err <= limit)).all()):
            why = (f"no plan with at most max_nz = {k} nonzeros per column has "
                   "these marginals (a mixed-integer program, HiGHS, finds none), "
                   "so the plan is the dual's read-out; raise max_nz.")
        elif repair and bool((binding & (err > limit)).any()):
            why = (f"max_nz = {k} binds and none of the supports the repair tried "
                   "holds a plan with these marginals, so the plan is the dual's "
                   "read-out")
            fewest = int(_fewest_nonzeros(a_t, b_t).min())
            if fewest > k * m:
                why += (f" (unless some rows' masses sum exactly to some columns', "
                        f"a plan needs n + m - 1 = {n + m - 1} nonzeros, more than "
                        f"max_nz * m = {k * m})")
            why += "; raise max_nz"
            if repair != "full" and n * m > _EXACT_OT_MAX_ENTRIES:
                why += (f", or pass repair='full' (beyond n m = "
                        f"{_EXACT_OT_MAX_ENTRIES:.0e} entries the supports from "
                        "linear programs are skipped)")
            elif repair != "full" and n * m > _MILP_MAX_ENTRIES and fewest <= k * m:
                why += (f", or pass repair='full' (beyond n m = {_MILP_MAX_ENTRIES} "
                        "entries it alone runs a mixed-integer program for a "
                        "support, in seconds to tens of seconds)")
            why += "."
        elif not repair:
            why = "increase max_iter or gamma, or pass repair=True."
        else:
            why = ("increase max_iter or gamma, or max_nz if the chosen supports "
                   "admit no feasible plan.")
        warnings.warn(
            f"sparsity_constrained_ot: the plan misses the marginals (L1 error "
            f"{float((err / total).max()):.2e} of the total mass > tol={tol_eff:.1e}) "
            f"after {int(res.n_iter.max())}"
            f" iterations; {why}",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )

    fields = {
        "plan": plan, "alpha": alpha, "beta": beta, "cost": cost,
        "dual_objective": res.dual_objective, "primal_objective": primal,
        "duality_gap": primal - res.dual_objective, "n_iter": res.n_iter,
        "converged": res.converged, "marginal_error": err,
        "readout_marginal_error": readout_err, "repaired": repaired,
        "binding": binding, "infeasible": infeasible,
    }
    return fields, primal


def _package(fields, primal, a, b, C_in, gamma, a_t, b_t, batched, is_torch):
    value = primal
    plan, alpha, beta = fields["plan"], fields["alpha"], fields["beta"]
    if is_torch and torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in (C_in, a, b, gamma)):
        C_g = C_in if C_in.dim() == 3 else C_in.unsqueeze(0)
        a_g = a if isinstance(a, torch.Tensor) else a_t
        b_g = b if isinstance(b, torch.Tensor) else b_t
        a_g = a_g.expand_as(a_t) if a_g.dim() == 1 else a_g
        b_g = b_g.expand_as(b_t) if b_g.dim() == 1 else b_g
        value = _OptimalValue.apply(C_g, a_g, b_g, gamma, primal.to(C_in.device),
                                    plan.to(C_in.device), alpha.to(C_in.device),
                                    beta.to(C_in.device))

    out_device = C_in.device if is_torch else None
    out = {}
    for name, tensor in fields.items():
        tensor = tensor if batched else tensor[0]
        if is_torch:
            out[name] = tensor.to(out_device)
        else:
            array = to_numpy(tensor)
            out[name] = array if array.ndim else array.item()
    if is_torch:
        out["value"] = value if batched else value[0]
        out["plan_sparse"] = out["plan"].to_sparse_coo()
    else:
        out["value"] = out["primal_objective"]
        plans = out["plan"] if batched else [out["plan"]]
        sparse = [sp.coo_array(p) for p in plans]
        out["plan_sparse"] = sparse if batched else sparse[0]
    return SparseOTResult(**out)

