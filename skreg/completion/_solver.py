"""Alternating minimization for low-rank matrix completion, in pure torch.

The observed entries arrive as COO index tensors ``(rows, cols, values)``. They
are stored twice as compressed sparse rows, once by row and once by column, so
that every half-step is made of two sparse kernels that cost O(|Omega| k):

* ``sampled_addmm`` (SDDMM) evaluates ``<u_i, v_j>`` on the observed pattern only;
* a CSR times dense product (SpMM) sums ``v_j`` weighted by those values per row.

Nothing of size ``m x n`` is ever formed.
"""

import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

__all__ = [
    "CompletionResult",
    "ObservedEntries",
    "alternating_minimization",
    "fold_in_rows",
    "observed_entries",
    "ridge_rows_cg",
    "ridge_rows_exact",
    "spectral_init",
    "training_rmse",
]

# Relative diagonal shift (times the mean eigenvalue of each normal matrix) that
# keeps the Cholesky factorization of a positive semi-definite Gram matrix
# defined when ``alpha`` is zero; small enough not to bias exact recovery.
_JITTER = 10.0

_PRECONDITIONER_FLOOR = 1e-30

# Multiple of eps times the RMS of the observed values below which the training
# RMSE counts as converged (exact fits reach about 10 eps).
_ROUNDOFF_FACTOR = 100.0

# CG in a half-step stops (after n_cg_steps) once a step lowers the half-step
# objective by at most this fraction of its value; see ridge_rows_cg.
_CG_RTOL = 1e-2


class ObservedEntries(NamedTuple):
    """The observed entries of an ``m x n`` matrix, indexed both ways.

    ``by_row`` is the ``m x n`` CSR matrix of the observed values, ``by_col`` the
    ``n x m`` CSR matrix of the same values (the transpose); the ``*_ones``
    variants share their indices with value 1 (the sampling pattern).
    """

    by_row: torch.Tensor
    by_col: torch.Tensor
    by_row_ones: torch.Tensor
    by_col_ones: torch.Tensor
    row_counts: torch.Tensor
    col_counts: torch.Tensor


@dataclass
class CompletionResult:
    """What the solver reports besides the factors."""

    n_iter: int
    converged: bool
    rmse_history: list = field(default_factory=list)


def _csr(major, minor, values, n_major, n_minor):
    order = torch.argsort(major * n_minor + minor)
    counts = torch.bincount(major, minlength=n_major)
    crow = torch.zeros(n_major + 1, dtype=torch.int64, device=values.device)
    crow[1:] = torch.cumsum(counts, 0)
    with warnings.catch_warnings():
        # torch flags CSR as beta once per process; the kernels used here are
        # stable on CPU and CUDA since torch 2.0.
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        by_values = torch.sparse_csr_tensor(
            crow, minor[order], values[order], (n_major, n_minor)
        )
        by_ones = torch.sparse_csr_tensor(
            crow, minor[order], torch.ones_like(values), (n_major, n_minor)
        )
    return by_values, by_ones, counts


def observed_entries(rows, cols, values, shape):
    """Index the observed entries by row and by column.

    Parameters
    ----------
    rows, cols : torch.Tensor of int64, shape (nnz,)
        Positions of the observed entries, without duplicates.
    values : torch.Tensor of float, shape (nnz,)
        Their values.
    shape : tuple of int
        ``(m, n)``.

    Returns
    -------
    ObservedEntries
    """
    m, n = shape
    rows = rows.to(device=values.device, dtype=torch.int64)
    cols = cols.to(device=values.device, dtype=torch.int64)
    by_row, by_row_ones, row_counts = _csr(rows, cols, values, m, n)
    by_col, by_col_ones, col_counts = _csr(cols, rows, values, n, m)
    return ObservedEntries(by_row, by_col, by_row_ones, by_col_ones,
                           row_counts, col_counts)


def _orthonormal(Y):
    return torch.linalg.qr(Y, mode="reduced").Q


def spectral_init(entries, rank, generator, n_power_iter=4, clip_factor=2.0):
    """Top-``rank`` SVD of the rescaled observed matrix, with row clipping.

    ``P_Omega(M) / p`` (``p`` the observed fraction) is an unbiased estimate of
    ``M``; its top singular subspace is found by a randomized range finder with
    power iterations, using only sparse products. Rows of the left factor whose
    norm exceeds ``clip_factor`` times the root-mean-square row norm
    ``sqrt(k / m)`` are shrunk to that norm and the factor is re-orthonormalized
    (Jain, Netrapalli and Sanghavi, 2013), which keeps a few heavy rows from
    dominating the start.

    Returns
    -------
    U : torch.Tensor, shape (m, rank)
    V : torch.Tensor, shape (n, rank)
        Scaled so that ``U @ V.T`` approximates the rescaled observed matrix.
    """
    A, At = entries.by_row, entries.by_col
    m, n = A.shape
    dtype, device = A.dtype, A.device
    nnz = entries.row_counts.sum()
    scale = (m * n) / nnz.clamp_min(1).to(dtype)
    width = min(rank + 10, m, n)
    sketch = torch.randn(n, width, generator=generator, dtype=dtype, device=device)
    Q = _orthonormal(A @ sketch)
    for _ in range(n_power_iter):
        Q = _orthonormal(A @ _orthonormal(At @ Q))
    B = (At @ Q).T * scale
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub[:, :rank]
    s = s[:rank]
    V = Vh[:rank].T
    threshold = clip_factor * math.sqrt(rank / m)
    norms = torch.linalg.vector_norm(U, dim=1, keepdim=True)
    U = U * torch.clamp(threshold / norms.clamp_min(_PRECONDITIONER_FLOOR), max=1.0)
    Q, R = torch.linalg.qr(U, mode="reduced")
    # Keep each column's sign and order (QR may flip them).
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    root = torch.sqrt(s)
    return Q * signs * root, V * root


def _solve_spd(G, b):
    """Solve the batched positive semi-definite systems ``G x = b``.

    Systems that are numerically singular (fewer observations than the rank and
    no ridge) fall back to the pseudo-inverse, i.e. the minimum-norm solution.
    """
    k = G.shape[-1]
    trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    shift = _JITTER * torch.finfo(G.dtype).eps * trace / k
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G + shift[:, None, None] * eye)
    x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    failed = info > 0
    if bool(failed.any()):
        pinv = torch.linalg.pinv(G[failed], hermitian=True)
        x[failed] = (pinv @ b[failed].unsqueeze(-1)).squeeze(-1)
    return x


def ridge_rows_exact(values, pattern, F, alpha):
    """Exact ridge half-step: ``x_i = (F_i^T F_i + alpha I)^{-1} F_i^T y_i``.

    ``F_i`` holds the rows of ``F`` at the observed columns of row ``i``. All
    ``k x k`` normal matrices are built at once as one sparse product of the
    pattern with the row-wise Kronecker squares of ``F`` (O(|Omega| k^2)).

    Parameters
    ----------
    values, pattern : sparse CSR tensors, shape (n_rows, n_other)
        Observed values and the sampling pattern (ones).
    F : torch.Tensor, shape (n_other, k)
        The fixed factor.
    alpha : float
        Ridge penalty.

    Returns
    -------
    torch.Tensor, shape (n_rows, k)
    """
    k = F.shape[1]
    squares = (F[:, :, None] * F[:, None, :]).reshape(F.shape[0], k * k)
    G = (pattern @ squares).reshape(-1, k, k)
    G = G + alpha * torch.eye(k, dtype=F.dtype, device=F.device)
    return _solve_spd(G, values @ F)


def _gram_matvec(pattern, F, X, alpha):
    products = torch.sparse.sampled_addmm(pattern, X, F.T, beta=0.0)
    return products @ F + alpha * X


def _safe_divide(a, b):
    return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)),
                       torch.zeros_like(a))


def ridge_rows_cg(values, pattern, counts, F, X0, alpha, n_steps, col_weights,
                  rtol=_CG_RTOL):
    """Approximate ridge half-step by preconditioned batched CG.

    Every row's system ``(F_i^T F_i + alpha I) x_i = F_i^T y_i`` is advanced
    together; one matrix-vector product for all rows costs O(|Omega| k). The
    preconditioner of row ``i`` is its expected normal matrix under the
    sampling, ``|Omega_i| W + alpha I`` with ``W = sum_j w_j f_j f_j^T`` and
    ``w_j`` the share of observations falling in column ``j``: one ``k x k``
    eigendecomposition serves all rows.

    At least ``n_steps`` steps are taken. With ``rtol`` set, CG goes on (up to
    ``max(n_steps, k)`` steps, where CG is exact in exact arithmetic) while its
    last step lowered the half-step objective ``1/2 ||P_Omega(y - X F^T)||^2 +
    alpha/2 ||X||^2`` by more than ``rtol`` times the objective's current value:
    the ``(1 + eps)``-approximate regression that inexact alternating
    minimization asks of each half-step, estimated from CG's own exact decrease
    ``step * r^T z / 2``. A fixed number of steps is not enough when the
    preconditioner is poor, e.g. on an uncentered matrix whose mean dwarfs its
    other components.

    Parameters
    ----------
    values, pattern : sparse CSR tensors, shape (n_rows, n_other)
    counts : torch.Tensor, shape (n_rows,)
        Observations per row.
    F : torch.Tensor, shape (n_other, k)
    X0 : torch.Tensor, shape (n_rows, k)
        Warm start (the previous iterate).
    alpha : float
    n_steps : int
        Minimum number of CG steps.
    col_weights : torch.Tensor, shape (n_other,)
        Share of the observations in each column of ``F``'s index.
    rtol : float or None, default=1e-2
        Relative decrease below which CG stops after ``n_steps``; None takes
        exactly ``n_steps`` steps.

    Returns
    -------
    torch.Tensor, shape (n_rows, k)
    """
    W = (F * col_weights[:, None]).T @ F
    eigvals, eigvecs = torch.linalg.eigh(W)
    eigvals = eigvals.clamp_min(0)
    scale = counts.to(F.dtype)[:, None] * eigvals[None, :] + alpha
    scale = scale.clamp_min(_PRECONDITIONER_FLOOR)

    def precondition(R):
        return ((R @ eigvecs) / scale) @ eigvecs.T

    products = torch.sparse.sampled_addmm(pattern, X0, F.T, beta=0.0)
    R = values @ F - (products @ F + alpha * X0)
    residual = values.values() - products.values()
    objective = 0.5 * (residual * residual).sum() + 0.5 * alpha * (X0 * X0).sum()
    # CG solves for the correction D = X - X0 with each row's residual divided
    # by its largest entry: the inner products of tiny residuals (data of
    # 1e-100 and below) would otherwise fall to subnormals and garble the steps
    size = R.abs().amax(1)
    size = torch.where(size > 0, size, torch.ones_like(size))
    R = R / size[:, None]
    D = torch.zeros_like(X0)
    Z = precondition(R)
    P = Z
    rz = (R * Z).sum(1)
    max_steps = n_steps if rtol is None else max(n_steps, F.shape[1])
    for n_done in range(1, max_steps + 1):
        AP = _gram_matvec(pattern, F, P, alpha)
        step = _safe_divide(rz, (P * AP).sum(1))
        D = D + step[:, None] * P
        R = R - step[:, None] * AP
        decrease = 0.5 * (step * rz * size.square()).sum()
        objective = objective - decrease
        Z = precondition(R)
        rz_next = (R * Z).sum(1)
        P = Z + _safe_divide(rz_next, rz)[:, None] * P
        rz = rz_next
        # One host sync per step beyond n_steps, none before.
        if n_done >= n_steps and n_done < max_steps and bool(
            decrease <= rtol * objective
        ):
            break
    return X0 + D * size[:, None]


def _shift_values(csr, offsets):
    """The CSR matrix ``y_ij - offsets[j]`` on the same pattern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            csr.crow_indices(), csr.col_indices(),
            csr.values() - offsets[csr.col_indices()], csr.shape,
        )


def _with_ones(F):
    return torch.cat([F, torch.ones_like(F[:, :1])], dim=1)


def training_rmse(entries, U, V, row_offsets=None, col_offsets=None):
    """Root-mean-square error of the model on the observed entries."""
    residual = torch.sparse.sampled_addmm(entries.by_row, U, V.T, beta=1.0,
                                          alpha=-1.0).values()
    if row_offsets is not None:
        A = entries.by_row
        counts = A.crow_indices().diff()
        rows = torch.repeat_interleave(
            torch.arange(A.shape[0], device=counts.device), counts)
        residual = residual - row_offsets[rows] - col_offsets[A.col_indices()]
    return torch.sqrt(torch.mean(residual * residual))


def _half_step(values, pattern, counts, F, offsets, X0, alpha, exact, n_cg_steps,
               shares, cg_rtol):
    """Update one side's factors (with their offsets when ``offsets`` is given)."""
    if offsets is not None:
        values = _shift_values(values, offsets)
        F = _with_ones(F)
    if exact:
        return ridge_rows_exact(values, pattern, F, alpha)
    return ridge_rows_cg(values, pattern, counts, F, X0, alpha, n_cg_steps, shares,
                         cg_rtol)


def alternating_minimization(entries, rank, *, alpha=1e-3, max_iter=50, tol=1e-5,
                             exact=False, n_cg_steps=2, cg_rtol=_CG_RTOL,
                             init="svd", offsets=True, generator=None,
                             callback=None):
    """Fit ``M ~= U V^T + c 1^T + 1 b^T`` on the observed entries.

    Minimizes ``1/2 sum_{(i,j) in Omega} (M_ij - u_i . v_j - c_i - b_j)^2
    + alpha/2 (||U||_F^2 + ||V||_F^2 + ||c||^2 + ||b||^2)`` by alternating ridge
    steps (the offsets ``c``, ``b`` only when ``offsets=True``). One sweep
    updates ``(V, b)`` given ``(U, c)``, then ``(U, c)`` given ``(V, b)``: an
    offset is a factor column paired with a constant column of ones on the other
    side. With ``exact=False`` each half-step is at least ``n_cg_steps`` of
    preconditioned CG warm-started at the previous factor (O(|Omega| k) per
    step), more while the steps still lower the half-step objective by more
    than ``cg_rtol`` times its value (see :func:`ridge_rows_cg`); with
    ``exact=True`` it solves the normal equations (O(|Omega| k^2 + (m + n) k^3)).
    Whatever the mode, the last update of ``(U, c)`` is exact, so that it is
    exactly the ridge fold-in of the rows.

    Parameters
    ----------
    entries : ObservedEntries
        The observed entries (already centered by their global mean).
    rank : int
    alpha : float, default=1e-3
    max_iter : int, default=50
        Maximum number of sweeps.
    tol : float, default=1e-5
        Stop when the training RMSE changes by less than ``tol`` times itself,
        or falls to the rounding level (100 eps times the RMS of the values).
    exact : bool, default=False
    n_cg_steps : int, default=2
        Minimum number of CG steps per half-step.
    cg_rtol : float or None, default=1e-2
        Adaptive stopping of CG (see :func:`ridge_rows_cg`); None takes exactly
        ``n_cg_steps`` steps.
    init : {"svd", "random"}, default="svd"
    offsets : bool, default=True
        Fit a per-row offset ``c`` and a per-column offset ``b``.
    generator : torch.Generator, default=None
    callback : callable, default=None
        Called as ``callback(sweep, rmse)`` after each sweep.

    Returns
    -------
    U : torch.Tensor, shape (m, rank)
    V : torch.Tensor, shape (n, rank)
    row_offsets : torch.Tensor, shape (m,)
    col_offsets : torch.Tensor, shape (n,)
        Zeros when ``offsets=False``.
    result : CompletionResult
    """
    A = entries.by_row
    m, n = A.shape
    dtype, device = A.dtype, A.device
    row_seen = (entries.row_counts > 0).to(dtype)[:, None]
    col_seen = (entries.col_counts > 0).to(dtype)[:, None]
    if init == "svd":
        U, V = spectral_init(entries, rank, generator)
    else:
        U = torch.randn(m, rank, generator=generator, dtype=dtype, device=device)
        V = torch.randn(n, rank, generator=generator, dtype=dtype, device=device)
        U, V = U / rank**0.25, V / rank**0.25
    # Rows and columns without observations stay at zero: their fill is the mean.
    U, V = U * row_seen, V * col_seen
    c = torch.zeros(m, dtype=dtype, device=device)
    b = torch.zeros(n, dtype=dtype, device=device)
    nnz = entries.row_counts.sum().clamp_min(1).to(dtype)
    row_share = entries.row_counts.to(dtype) / nnz
    col_share = entries.col_counts.to(dtype) / nnz

    def update_rows(U, c, V, b, exact):
        if not offsets:
            return _half_step(entries.by_row, entries.by_row_ones, entries.row_counts,
                              V, None, U, alpha, exact, n_cg_steps, col_share,
                              cg_rtol), c
        X = _half_step(entries.by_row, entries.by_row_ones, entries.row_counts, V, b,
                       torch.cat([U, c[:, None]], 1), alpha, exact, n_cg_steps,
                       col_share, cg_rtol)
        return X[:, :rank], X[:, rank]

    def update_cols(U, c, V, b, exact):
        if not offsets:
            return _half_step(entries.by_col, entries.by_col_ones, entries.col_counts,
                              U, None, V, alpha, exact, n_cg_steps, row_share,
                              cg_rtol), b
        X = _half_step(entries.by_col, entries.by_col_ones, entries.col_counts, U, c,
                       torch.cat([V, b[:, None]], 1), alpha, exact, n_cg_steps,
                       row_share, cg_rtol)
        return X[:, :rank], X[:, rank]

    result = CompletionResult(n_iter=0, converged=False)
    previous = None
    # A training RMSE at the rounding level of the data has converged: its
    # relative changes there are noise and would never fall below tol.
    values = entries.by_row.values()
    floor = float(_ROUNDOFF_FACTOR * torch.finfo(dtype).eps
                  * torch.sqrt(torch.mean(values * values)))
    for sweep in range(1, max_iter + 1):
        V, b = update_cols(U, c, V, b, exact)
        U, c = update_rows(U, c, V, b, exact)
        rmse = float(training_rmse(entries, U, V, c, b))
        result.rmse_history.append(rmse)
        result.n_iter = sweep
        if callback is not None:
            callback(sweep, rmse)
        if rmse <= floor or (
            previous is not None and abs(previous - rmse) <= tol * previous
        ):
            result.converged = True
            break
        previous = rmse
    if not exact:
        U, c = update_rows(U, c, V, b, True)
        result.rmse_history[-1] = float(training_rmse(entries, U, V, c, b))
    return U, V, c, b, result


def fold_in_rows(rows, cols, values, n_rows, V, col_offsets, alpha, offsets=True):
    """Ridge factors (and offsets) of new rows against fixed column factors.

    Parameters
    ----------
    rows, cols : torch.Tensor of int64, shape (nnz,)
        Observed positions in the new rows.
    values : torch.Tensor, shape (nnz,)
        Observed values.
    n_rows : int
    V : torch.Tensor, shape (n, k)
    col_offsets : torch.Tensor, shape (n,)
        Column offsets, global mean included (zeros when not centering).
    alpha : float
    offsets : bool, default=True
        Fit a per-row offset too.

    Returns
    -------
    U : torch.Tensor, shape (n_rows, k)
    row_offsets : torch.Tensor, shape (n_rows,)
    """
    n, k = V.shape
    by_row, by_row_ones, _ = _csr(rows, cols, values - col_offsets[cols], n_rows, n)
    if not offsets:
        U = ridge_rows_exact(by_row, by_row_ones, V, alpha)
        return U, torch.zeros(n_rows, dtype=V.dtype, device=V.device)
    X = ridge_rows_exact(by_row, by_row_ones, _with_ones(V), alpha)
    return X[:, :k], X[:, k]
