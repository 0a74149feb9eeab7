"""Pure torch functions behind the regularizers: penalties, proximal steps and
spectra. No scikit-learn, no NumPy; tensors in, tensors out."""

import torch
import torch.nn.functional as F

__all__ = [
    "circular_conv_singular_values",
    "conv_orthogonality_penalty",
    "elr_penalty",
    "gram_residual",
    "group_lasso_prox_",
    "group_norms",
    "soft_orthogonality_penalty",
    "spectral_orthogonality_penalty",
]


def gram_residual(weight):
    """``W W^T - I`` or ``W^T W - I``, whichever Gram matrix is the smaller.

    ``weight`` is read as a matrix with one row per output unit (extra
    dimensions, e.g. of a conv kernel, are flattened into the columns).
    """
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    gram = matrix @ matrix.T
    # In place: no identity matrix allocated each step (autograd allows it, the
    # product's backward needs only its inputs).
    gram.diagonal().sub_(1.0)
    return gram


def soft_orthogonality_penalty(weight):
    """Soft orthogonality ``||W^T W - I||_F^2`` on the smaller side of ``W``."""
    return gram_residual(weight).square().sum()


def spectral_orthogonality_penalty(weight, u, n_power_iterations=1):
    """SRIP's penalty ``sigma_max(W^T W - I)^2`` by power iteration.

    Only products with ``W`` and ``W^T`` are formed, never the Gram matrix, so a
    step costs ``O(n m)`` instead of ``O(n m min(n, m))``. ``u`` (a unit vector
    of the Gram matrix's size) is the running estimate of the top singular
    vector; it is updated in place, so one iteration per step is enough once
    training has started (as in spectral normalization).
    """
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T

    def residual_times(vector):
        return matrix @ (matrix.T @ vector) - vector

    with torch.no_grad():
        vector = u
        for _ in range(n_power_iterations):
            vector = F.normalize(residual_times(vector), dim=0)
        u.copy_(vector)
    return residual_times(u).square().sum()


def _conv_identity(n_out, size, like):
    identity = torch.zeros(n_out, n_out, size, size, dtype=like.dtype,
                           device=like.device)
    centre = size // 2
    index = torch.arange(n_out, device=like.device)
    identity[index, index, centre, centre] = 1
    return identity


def conv_orthogonality_penalty(kernel, stride=1):
    """Kernel orthogonality loss of a 2-D convolution.

    ``L = ||conv(K, K, padding=P, stride=S) - I_r0||_F^2 - max(0, M - C S^2)``
    with ``P = floor((k - 1) / S) S`` for a kernel ``K`` of shape ``(M, C, k, k)``.
    It is zero exactly when the strided convolution is orthogonal (row
    orthogonality when ``M <= C S^2``, column orthogonality otherwise).
    """
    n_out, n_in, size, _ = kernel.shape
    padding = ((size - 1) // stride) * stride
    autocorrelation = F.conv2d(kernel, kernel, stride=stride, padding=padding)
    identity = _conv_identity(n_out, autocorrelation.shape[-1], kernel)
    excess = max(0, n_out - n_in * stride * stride)
    return (autocorrelation - identity).square().sum() - excess


def circular_conv_singular_values(kernel, image_size, stride=1, padding=None):
    """All singular values of a strided 2-D convolution with circular padding.

    The strided convolution on an ``N x N`` image is rewritten as a stride-1
    convolution over the ``S^2`` polyphase components of the input (an
    ``(N/S) x (N/S)`` image with ``C S^2`` channels); the 2-D DFT then
    block-diagonalizes it into ``(N/S)^2`` matrices of size ``M x C S^2``, whose
    singular values together are those of the whole operator (Sedghi, Gupta and
    Long, ICLR 2019).

    Parameters
    ----------
    kernel : tensor of shape (M, C, k, k)
    image_size : int
        ``N``, a multiple of ``stride``.
    stride : int, default=1
    padding : int, default=None
        The convolution's padding, which fixes where the kernel is centred;
        ``None`` means ``k // 2``.

    Returns
    -------
    tensor of shape ((N / S)^2 * min(M, C S^2),)
    """
    n_out, n_in, size, _ = kernel.shape
    if image_size % stride:
        raise ValueError(
            f"image_size={image_size} must be a multiple of stride={stride}."
        )
    padding = size // 2 if padding is None else padding
    n_grid = image_size // stride
    offsets = torch.arange(size, device=kernel.device) - padding
    shift = torch.div(offsets, stride, rounding_mode="floor") % n_grid
    phase = offsets % stride
    polyphase = kernel.new_zeros(n_out, n_in, stride, stride, n_grid, n_grid)
    for a in range(size):
        for b in range(size):
            polyphase[:, :, phase[a], phase[b], shift[a], shift[b]] += kernel[
                :, :, a, b
            ]
    spectrum = torch.fft.fft2(polyphase)
    blocks = spectrum.permute(4, 5, 0, 1, 2, 3).reshape(
        n_grid * n_grid, n_out, n_in * stride * stride
    )
    return torch.linalg.svdvals(blocks).flatten()


def elr_penalty(logits, targets, sample_index, beta):
    """Early-learning regularization term, updating the running targets in place.

    ``p = clamp(softmax(logits), 1e-4, 1 - 1e-4)``;
    ``t_i <- beta t_i + (1 - beta) p_i / sum(p_i)`` with ``p`` detached; the term
    is ``mean_i log(1 - <t_i, p_i>)`` (Liu et al., NeurIPS 2020).
    """
    proba = torch.softmax(logits, dim=1).clamp(1e-4, 1.0 - 1e-4)
    with torch.no_grad():
        detached = proba.detach()
        targets[sample_index] = beta * targets[sample_index] + (1.0 - beta) * (
            detached / detached.sum(dim=1, keepdim=True)
        )
    agreement = (targets[sample_index] * proba).sum(dim=1)
    return torch.log1p(-agreement).mean()


def _group_matrix(weight, bias):
    matrix = weight.reshape(weight.shape[0], -1)
    if bias is None:
        return matrix
    return torch.cat([matrix, bias[:, None]], dim=1)


def group_norms(weight, bias=None):
    """Euclidean norm of each output unit's group: its weights and its bias."""
    return _group_matrix(weight, bias).norm(dim=1)


def group_lasso_prox_(weight, bias, threshold):
    """Proximal step of ``threshold * sum_g ||w_g||`` over output-unit groups.

    Each group is shrunk by ``max(0, 1 - threshold / ||w_g||)``, so groups whose
    norm is below the threshold become exactly zero. Works in place and returns
    the new group norms, ``max(0, ||w_g|| - threshold)``.
    """
    norms = group_norms(weight, bias)
    scale = torch.clamp(1.0 - threshold / norms.clamp_min(1e-30), min=0.0)
    weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
    if bias is not None:
        bias.mul_(scale)
    return norms * scale
