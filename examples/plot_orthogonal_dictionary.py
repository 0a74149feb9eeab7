"""
======================================================
Denoising an image with an orthogonal patch dictionary
======================================================

A grayscale photograph (scikit-learn's bundled ``china.jpg``) is corrupted with
Gaussian noise. We cut it into overlapping 8 x 8 patches, learn a dictionary of 64
orthonormal atoms from the noisy patches themselves with
:class:`~skreg.decomposition.OrthogonalDictionaryLearning`, and denoise by hard
thresholding each patch's coefficients, then averaging the overlapping patches.

Because the atoms are orthonormal, coding is a single matrix product followed by a
threshold: no lasso, no OMP. We compare with scikit-learn's
:class:`~sklearn.decomposition.MiniBatchDictionaryLearning` (64 atoms, OMP codes),
which learns a general (non-orthogonal) dictionary, on quality (PSNR) and time.
"""

# %%
# Noisy image and patches
# -----------------------
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_sample_image
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.feature_extraction.image import (
    extract_patches_2d,
    reconstruct_from_patches_2d,
)
from threadpoolctl import threadpool_limits

from skreg.decomposition import OrthogonalDictionaryLearning

# Both learners run on one CPU thread: the matrices are small, and on a shared
# machine extra threads mostly wait for each other (we measured a 10x slowdown).
torch.set_num_threads(1)
threadpool_limits(1)

rng = np.random.RandomState(0)
image = load_sample_image("china.jpg").mean(axis=2) / 255.0
image = image[::3, ::3][16:112, 48:176]  # a small crop keeps the example quick
sigma = 0.08
noisy = image + sigma * rng.standard_normal(image.shape)


def psnr(estimate):
    return 10 * np.log10(1.0 / np.mean((estimate - image) ** 2))


patch_size = (8, 8)
patches = extract_patches_2d(noisy, patch_size).reshape(-1, 64)
# Each patch's mean (its DC component) is kept aside: the dictionary models the
# zero-mean texture, as the l4 objective assumes zero-mean codes.
patch_means = patches.mean(axis=1, keepdims=True)
patches = patches - patch_means
train = patches[rng.choice(len(patches), 4000, replace=False)]
print(f"image {image.shape}, {len(patches)} patches, noisy PSNR {psnr(noisy):.2f} dB")


def denoise(codes_to_patches):
    restored = codes_to_patches(patches) + patch_means
    return reconstruct_from_patches_2d(restored.reshape(-1, *patch_size),
                                       image.shape)


# %%
# Orthogonal dictionary: learn once, try several thresholds
# ---------------------------------------------------------
# With orthonormal atoms the noise stays white in the coefficients (standard
# deviation ``sigma``), so thresholds are naturally a few ``sigma``.
start = time.perf_counter()
odl = OrthogonalDictionaryLearning(algorithm="msp", random_state=0, device="cpu")
odl.fit(train)
odl_fit_seconds = time.perf_counter() - start

thresholds = sigma * np.array([1.0, 1.5, 2.0, 2.5, 3.0, 4.0])
odl_psnr = []
for alpha in thresholds:
    odl.set_params(transform_algorithm="hard", transform_alpha=alpha)
    odl_psnr.append(psnr(denoise(lambda P: odl.inverse_transform(odl.transform(P)))))
best_alpha = thresholds[int(np.argmax(odl_psnr))]
odl.set_params(transform_alpha=best_alpha)
start = time.perf_counter()
odl_image = denoise(lambda P: odl.inverse_transform(odl.transform(P)))
odl_code_seconds = time.perf_counter() - start
print(f"orthogonal: fit {odl_fit_seconds:.2f} s, coding {odl_code_seconds:.2f} s, "
      f"PSNR {max(odl_psnr):.2f} dB at alpha = {best_alpha / sigma:.1f} sigma")

# %%
# MiniBatchDictionaryLearning with OMP codes, at equal sparsity
# -------------------------------------------------------------
# OMP gets as many non-zeros per patch as the orthogonal codes use on average at
# their best threshold, so both denoisers spend the same sparsity budget.
n_nonzero = max(1, round(np.count_nonzero(odl.transform(patches)) / len(patches)))
start = time.perf_counter()
mbdl = MiniBatchDictionaryLearning(n_components=64, alpha=0.05, batch_size=256,
                                   fit_algorithm="cd",
                                   max_iter=3, transform_algorithm="omp",
                                   transform_n_nonzero_coefs=n_nonzero,
                                   random_state=0).fit(train)
mbdl_fit_seconds = time.perf_counter() - start
start = time.perf_counter()
mbdl_image = denoise(lambda P: mbdl.transform(P) @ mbdl.components_)
mbdl_code_seconds = time.perf_counter() - start
print(f"MiniBatch: fit {mbdl_fit_seconds:.2f} s, coding {mbdl_code_seconds:.2f} s, "
      f"PSNR {psnr(mbdl_image):.2f} dB with {n_nonzero} non-zeros")

# %%
# The learned atoms
# -----------------
# The orthogonal atoms look like a data-adapted DCT: oriented edges and
# gratings at several frequencies, each orthogonal to the others.
fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
for ax, components, title in [
    (axes[0], odl.components_, "OrthogonalDictionaryLearning"),
    (axes[1], mbdl.components_, "MiniBatchDictionaryLearning"),
]:
    # atoms sorted by the energy of their coefficients: structure first, the
    # atoms that only span noise last
    energy = np.mean((patches @ components.T) ** 2, axis=0)
    tiles = components[np.argsort(energy)[::-1]].reshape(64, 8, 8)
    tiles = tiles / np.abs(tiles).max(axis=(1, 2), keepdims=True)
    tiles = np.pad(tiles, ((0, 0), (0, 1), (0, 1)))
    mosaic = tiles.reshape(8, 8, 9, 9).transpose(0, 2, 1, 3).reshape(72, 72)
    ax.imshow(mosaic, cmap="gray", interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
fig.suptitle("64 atoms learned from noisy 8 x 8 patches")

# %%
# Denoised images
# ---------------
fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
panels = [
    (image, "original"),
    (noisy, f"noisy: {psnr(noisy):.1f} dB"),
    (odl_image, f"orthogonal: {psnr(odl_image):.1f} dB\n"
                f"fit {odl_fit_seconds:.1f} s + code {odl_code_seconds:.1f} s"),
    (mbdl_image, f"MiniBatch + OMP: {psnr(mbdl_image):.1f} dB\n"
                 f"fit {mbdl_fit_seconds:.1f} s + code {mbdl_code_seconds:.1f} s"),
]
for ax, (picture, title) in zip(axes, panels, strict=True):
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
fig.tight_layout()

# %%
# Threshold sensitivity
# ---------------------
fig, ax = plt.subplots(figsize=(5, 3.4))
ax.plot(thresholds / sigma, odl_psnr, "o-", label="orthogonal, hard threshold")
ax.axhline(psnr(mbdl_image), color="gray", ls="--",
           label=f"MiniBatch + OMP ({n_nonzero} non-zeros)")
ax.axhline(psnr(noisy), color="k", ls=":", label="noisy input")
ax.set_xlabel("threshold / noise standard deviation")
ax.set_ylabel("PSNR (dB)")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Take-away: an orthogonal basis learned in about the time of a few matrix
# products codes all patches with one product and a threshold; a general
# dictionary is more expressive but needs a pursuit per patch. The threshold
# tracks the noise level, so set it from an estimate of ``sigma``.
