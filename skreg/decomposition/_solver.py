"""Pure torch solvers for orthogonal dictionary learning.

Conventions: data ``Y`` is sample-major, shape ``(n_samples, n_features)``; the
dictionary ``A`` has shape ``(n_components, n_features)`` with orthonormal rows
(``A @ A.T = I``), so the codes of ``Y`` are ``Y @ A.T`` and the reconstruction is
``codes @ A``. Nothing here imports scikit-learn or NumPy; the loops never call
``.item()`` except to log when ``verbose`` is set.
"""

import logging
import math
from dataclasses import dataclass

import torch

from skreg.utils._scaling import (
    largest_magnitude,
    power_of_two_exponent,
    times_power_of_two,
)

logger = logging.getLogger("skreg.decomposition")

# The convergence test reads a scalar back from the device; doing it every few
# iterations instead of every one keeps a GPU loop free of host syncs.
_CHECK_EVERY = 5


@dataclass
class SolverResult:
    """What a solver reports besides the dictionary.

    Attributes
    ----------
    n_iter : int
        Iterations (``msp``, ``procrustes``) or epochs (``frank_wolfe``) run.
    converged : bool
        Whether the relative change of the objective fell below ``tol``.
    objective : torch.Tensor
        One value per iteration (or epoch), on the solver's device.
    n_steps : int
        Frank-Wolfe steps taken in total (0 for the batch solvers).
    """

    n_iter: int
    converged: bool
    objective: torch.Tensor
    n_steps: int = 0


def polar_factor(M):
    """Orthogonal polar factor ``U @ Vh`` of ``M = U diag(s) Vh`` (thin SVD).

    For ``M`` of shape ``(k, n)`` with ``k <= n`` the result has orthonormal rows:
    it is the point of the Stiefel manifold closest to ``M`` in Frobenius norm and
    the maximizer of ``<A, M>`` over the spectral-norm ball.
    """
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def random_orthogonal(n_components, n_features, *, generator, dtype, device):
    """A Haar-distributed ``(n_components, n_features)`` matrix with orthonormal rows.

    QR of a Gaussian matrix, with the signs of ``R``'s diagonal moved into ``Q`` so
    the draw is uniform on the Stiefel manifold, not biased by the QR convention.
    The Gaussian is drawn where ``generator`` lives, then moved to ``device``.
    """
    G = torch.randn(
        n_features, n_components, generator=generator, dtype=dtype,
        device=generator.device,
    ).to(device)
    Q, R = torch.linalg.qr(G)
    signs = torch.sign(torch.diagonal(R))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (Q * signs).T.contiguous()


def unit_rows(Y, *, inplace=False):
    """``Y`` scaled to rows of norm at most 1, and the scale's exponent.

    Returns ``(Y * 2^-e, e)`` with ``e`` the smallest integer such that the
    largest row norm is at most ``2^e``; ``e`` is None for a zero ``Y``.
    The dictionaries the solvers return do not change when the data are scaled
    (the polar factor ignores a positive factor; the Procrustes threshold scales
    with the data), but ``|y a|^(p-1)`` leaves the floating-point range long
    before the data do: at ``p = 4``, float32 data of magnitude 1e10 overflowed
    and data of 1e-12 underflowed to a zero gradient. Rows of norm at most 1
    give codes of magnitude at most 1, whatever ``p``. A power of two scales
    exactly, so results do not depend on how a stream is chunked; the norm is
    taken after scaling by the largest entry, so it cannot overflow on its way.
    ``inplace`` may scale ``Y`` itself (a temporary of the caller's).
    """
    exponent = power_of_two_exponent(largest_magnitude(Y))
    if exponent is None:
        return Y, None
    if abs(exponent) < power_of_two_exponent(torch.finfo(Y.dtype).max) // 4:
        # The squares of the norms stay far inside the range: one pass less
        # (and, ``inplace``, no copy: a 10 MB copy was 5 ms of a 0.15 s fit).
        exponent = power_of_two_exponent(torch.linalg.vector_norm(Y, dim=1).amax())
        if inplace:
            return Y.mul_(2.0**-exponent), exponent
        return times_power_of_two(Y, -exponent), exponent
    Y = times_power_of_two(Y, -exponent)
    shift = power_of_two_exponent(torch.linalg.vector_norm(Y, dim=1).amax())
    return times_power_of_two(Y, -shift), exponent + shift


def _signed_power(Z, power):
    # d/dz |z|^p / p = sign(z) |z|^(p-1); the even integer case avoids abs/sign.
    if power == 4:
        return Z * Z * Z
    return torch.sign(Z) * Z.abs().pow(power - 1)


def lp_objective(A, Y, power=4):
    """Mean over samples of ``||A y||_p^p``, the quantity the l_p solvers maximize.

    Parameters
    ----------
    A : torch.Tensor of shape (n_components, n_features)
    Y : torch.Tensor of shape (n_samples, n_features)
    power : float, default=4

    Returns
    -------
    torch.Tensor
        A 0-d tensor on ``Y``'s device.
    """
    return (Y @ A.T).abs().pow(power).sum() / Y.shape[0]


def lp_gradient(A, Y, power=4):
    """Gradient of :func:`lp_objective` divided by ``power``, and the objective.

    Returns ``(G, f)`` with ``G = sign(Z)|Z|^(p-1)^T Y / n`` and ``Z = Y A^T``; the
    common factor ``p`` is dropped because every caller only uses the polar factor
    of ``G`` (or an average of such gradients), which ignores a positive scale.
    """
    Z = Y @ A.T
    W = _signed_power(Z, power)
    n_samples = Y.shape[0]
    return W.T @ Y / n_samples, (W * Z).sum() / n_samples


def hard_threshold(Z, alpha):
    """Keep the entries of ``Z`` with ``|z| > alpha``, zero the rest.

    With an orthonormal dictionary this is the exact minimizer of
    ``1/2 ||y - A^T x||^2 + alpha^2 / 2 ||x||_0``.
    """
    return Z * (Z.abs() > alpha)


def soft_threshold(Z, alpha):
    """``sign(z) max(|z| - alpha, 0)``: the exact lasso codes for orthonormal atoms."""
    return torch.sign(Z) * torch.clamp(Z.abs() - alpha, min=0)


def _relative_change(previous, current):
    return (current - previous).abs() / previous.abs().clamp_min(
        torch.finfo(current.dtype).tiny
    )


def _iterate(step, A, max_iter, tol, verbose, name):
    """Run ``A, f = step(A)`` until the objective's relative change is below tol.

    The test is evaluated every ``_CHECK_EVERY`` iterations (and at the last one)
    over the block just run, so the loop syncs with the device rarely.
    """
    objectives = []
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        A, f = step(A)
        objectives.append(f)
        if verbose:
            logger.info("%s iteration %d: objective %.6g", name, n_iter, f.item())
        if len(objectives) > 1 and (n_iter % _CHECK_EVERY == 0 or n_iter == max_iter):
            block = torch.stack(objectives[-_CHECK_EVERY - 1:])
            if bool((_relative_change(block[:-1], block[1:]) <= tol).any()):
                converged = True
                break
    return A, SolverResult(n_iter, converged, torch.stack(objectives))


def msp(Y, A, *, power=4, max_iter=100, tol=1e-6, verbose=False):
    """Matching, stretching and projection: ``A <- Polar((A Y)^(p-1) Y^T)``.

    Parameters
    ----------
    Y : torch.Tensor of shape (n_samples, n_features)
    A : torch.Tensor of shape (n_components, n_features)
        Starting dictionary with orthonormal rows.
    power : float, default=4
        ``p`` of the l_p objective (``sign(z)|z|^(p-1)`` replaces the cube).
    max_iter : int, default=100
    tol : float, default=1e-6
        Stop when the objective's relative change falls below ``tol``.
    verbose : bool, default=False

    Returns
    -------
    A : torch.Tensor of shape (n_components, n_features)
    result : SolverResult
        ``objective[t]`` is the l_p objective of the dictionary entering iteration
        ``t`` (the last dictionary returned is one step further on).

    Notes
    -----
    Each iteration maximizes the linearization of the convex objective
    ``f(A) = sum ||A y_i||_p^p`` over the orthogonal group (or Stiefel manifold), so
    ``f`` never decreases (Zhai, Yang, Liao, Wright, Ma 2020, arXiv:1906.02435).
    """

    def step(A):
        G, f = lp_gradient(A, Y, power)
        return polar_factor(G), f

    return _iterate(step, A, max_iter, tol, verbose, "msp")


def procrustes(Y, A, *, alpha, max_iter=100, tol=1e-6, verbose=False):
    """Alternate hard-thresholded codes and an orthogonal Procrustes update.

    ``X <- H_alpha(Y A^T)``, then ``A <- Polar(X^T Y)``, the exact minimizers of
    ``1/2 ||Y - X A||_F^2 + alpha^2 / 2 ||X||_0`` in each block when ``A`` has
    orthonormal rows; the objective (divided by ``n_samples``) never increases.

    Parameters
    ----------
    Y : torch.Tensor of shape (n_samples, n_features)
    A : torch.Tensor of shape (n_components, n_features)
    alpha : float
        Hard threshold of the codes.
    max_iter : int, default=100
    tol : float, default=1e-6
    verbose : bool, default=False

    Returns
    -------
    A : torch.Tensor of shape (n_components, n_features)
    result : SolverResult
        ``objective[t]`` is the penalized residual at the codes of iteration ``t``
        and the dictionary entering it.

    Notes
    -----
    The l0 orthogonal dictionary learning of Bao, Cai and Ji (ICCV 2013).
    """
    n_samples = Y.shape[0]
    squared_norm = (Y * Y).sum()

    def step(A):
        Z = Y @ A.T
        X = hard_threshold(Z, alpha)
        # ||Y - X A||^2 = ||Y||^2 - 2<X, Z> + ||X||^2 because A A^T = I.
        residual = squared_norm - 2 * (X * Z).sum() + (X * X).sum()
        f = (0.5 * residual + 0.5 * alpha**2 * (X != 0).sum()) / n_samples
        return polar_factor(X.T @ Y), f

    return _iterate(step, A, max_iter, tol, verbose, "procrustes")


def frank_wolfe_step_sizes(t):
    """The averaging weight ``rho_t`` and the step ``gamma_t`` of step ``t >= 1``.

    ``rho_t = min(1, 4 / (t + 1)^(1/2))`` and ``gamma_t = 2 / (t + 2)^(3/4)``.
    The authors' code counts from ``t = 0`` and leaves ``rho_t`` uncapped, so its
    first fifteen averages extrapolate (``rho_t > 1``) and its first step has
    ``gamma_0 = 1.19``; the cap keeps ``G_t`` a convex combination of gradients.
    """
    rho = min(1.0, 4.0 / math.sqrt(t + 1))
    gamma = 2.0 / (t + 2) ** 0.75
    return rho, gamma


def frank_wolfe_step(A, G, Y, t, *, power=4):
    """One online Frank-Wolfe step on the batch ``Y``; ``t`` counts from 1.

    ``G <- (1 - rho_t) G + rho_t g_t`` with ``g_t`` the batch gradient at ``A``,
    ``S = Polar(G)`` (the linear maximizer over the spectral-norm ball),
    ``A <- Polar((1 - gamma_t) A + gamma_t S)``.

    Parameters
    ----------
    A : torch.Tensor of shape (n_components, n_features)
    G : torch.Tensor of shape (n_components, n_features) or None
        Running gradient average; ``None`` on the first step.
    Y : torch.Tensor of shape (batch_size, n_features)
    t : int
        Index of this step, from 1.
    power : float, default=4

    Returns
    -------
    A, G : torch.Tensor
        The new dictionary and gradient average.
    f : torch.Tensor
        The batch's l_p objective at the dictionary entering the step (an honest,
        progressive-validation measure of the online fit).
    """
    rho, gamma = frank_wolfe_step_sizes(t)
    g, f = lp_gradient(A, Y, power)
    G = g if G is None or rho >= 1.0 else torch.lerp(G, g, rho)
    S = polar_factor(G)
    # A zero average (only zero samples so far) points nowhere: its polar factor
    # is whatever the SVD makes of zero, and the step would pull A towards it.
    A = torch.where(G.abs().amax() > 0, polar_factor(torch.lerp(A, S, gamma)), A)
    return A, G, f


def frank_wolfe(Y, A, *, power=4, batch_size=256, max_iter=1, tol=1e-6,
                generator=None, G=None, t0=0, verbose=False):
    """Epochs of online Frank-Wolfe steps over shuffled mini-batches of ``Y``.

    Parameters
    ----------
    Y : torch.Tensor of shape (n_samples, n_features)
    A : torch.Tensor of shape (n_components, n_features)
    power : float, default=4
    batch_size : int, default=256
    max_iter : int, default=1
        Number of passes over the data.
    tol : float, default=1e-6
        Stop when the mean batch objective of an epoch changes by less than ``tol``
        (relative) from the previous epoch.
    generator : torch.Generator or None
        Draws the order of the samples in each epoch; ``None`` keeps the order.
    G : torch.Tensor or None
        Gradient average to continue from.
    t0 : int, default=0
        Steps already taken (the step sizes continue from ``t0 + 1``).
    verbose : bool, default=False

    Returns
    -------
    A : torch.Tensor
    G : torch.Tensor
        The gradient average after the last step.
    result : SolverResult
        ``objective`` holds one value per epoch; ``n_steps`` the total step count.
    """
    n_samples = Y.shape[0]
    t = t0
    epoch_objectives = []
    converged = False
    n_epochs = 0
    for n_epochs in range(1, max_iter + 1):
        if generator is None:
            order = torch.arange(n_samples, device=Y.device)
        else:
            order = torch.randperm(
                n_samples, generator=generator, device=generator.device
            ).to(Y.device)
        total = torch.zeros((), dtype=Y.dtype, device=Y.device)
        for start in range(0, n_samples, batch_size):
            batch = Y[order[start:start + batch_size]]
            t += 1
            A, G, f = frank_wolfe_step(A, G, batch, t, power=power)
            total = total + f * batch.shape[0]
        epoch_objectives.append(total / n_samples)
        if verbose:
            logger.info("frank_wolfe epoch %d (%d steps): objective %.6g", n_epochs,
                        t, epoch_objectives[-1].item())
        if len(epoch_objectives) > 1:
            change = _relative_change(epoch_objectives[-2], epoch_objectives[-1])
            if bool(change <= tol):
                converged = True
                break
    result = SolverResult(n_epochs, converged, torch.stack(epoch_objectives), t - t0)
    return A, G, result
