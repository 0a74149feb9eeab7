"""
==============================================
Inpainting a photograph by low-rank completion
==============================================

A grayscale photograph (scikit-learn's bundled ``flower.jpg``, halved to
214 x 320) loses 70% of its pixels at random. Seen as a matrix, a natural image
is close to low-rank: its rows are mixtures of a few row profiles. We fill the
erased pixels with :class:`~skreg.completion.LowRankCompleter` and choose the rank
without looking at the erased pixels: a further 10% of the *visible* pixels are
hidden from the fit through the ``mask`` argument and used as a validation set.

The validation curve picks the rank; the error on the truly erased pixels (which
only this demo can compute) follows it closely. Too small a rank blurs the image;
beyond rank 8 the curve flattens, because the ridge penalty ``alpha`` (a
nuclear-norm penalty in disguise) shrinks the extra singular values instead of
letting them fit the noise of the 30% that remain. A column-mean imputer is the
baseline.
"""

# %%
# Erase 70% of the pixels
# -----------------------
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_sample_image

from skreg.completion import LowRankCompleter

image = load_sample_image("flower.jpg").mean(axis=2)[::2, ::2] / 255.0
rng = np.random.RandomState(0)
erased = rng.rand(*image.shape) < 0.7
X = np.where(erased, np.nan, image)
print(f"image {image.shape}, {erased.mean():.0%} of the pixels erased")


def rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


column_means = np.nanmean(X, axis=0)
baseline = rmse(np.broadcast_to(column_means, image.shape)[erased], image[erased])
print(f"column means: RMSE on the erased pixels {baseline:.3f}")

# %%
# Choose the rank on held-out visible pixels
# ------------------------------------------
# ``mask=False`` hides a pixel from the fit exactly as if it were missing, so the
# completer's prediction there is an honest validation estimate.
visible = ~erased
fit_mask = visible & (rng.rand(*image.shape) > 0.1)
validation = visible & ~fit_mask

ranks = [2, 4, 8, 16, 32]
validation_rmse, erased_rmse = [], []
for rank in ranks:
    completer = LowRankCompleter(rank=rank, alpha=0.3, max_iter=50, tol=1e-3,
                                 random_state=0)
    filled = completer.fit_transform(X, mask=fit_mask)
    validation_rmse.append(rmse(filled[validation], image[validation]))
    erased_rmse.append(rmse(filled[erased], image[erased]))
    print(f"rank {rank:2d}: validation RMSE {validation_rmse[-1]:.3f}, "
          f"erased-pixel RMSE {erased_rmse[-1]:.3f}")
best_rank = ranks[int(np.argmin(validation_rmse))]
print(f"rank chosen on the validation pixels: {best_rank}")

# %%
# Refit on every visible pixel with the chosen rank
# -------------------------------------------------
completer = LowRankCompleter(rank=best_rank, alpha=0.3, max_iter=50, tol=1e-3,
                             random_state=0)
restored = completer.fit_transform(X)
print(f"final RMSE on the erased pixels: {rmse(restored[erased], image[erased]):.3f} "
      f"(column means: {baseline:.3f}), {completer.n_iter_} sweeps")

fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
panels = [
    (image, "original"),
    (np.where(erased, 0.0, image), "70% of pixels erased"),
    (np.clip(restored, 0, 1), f"low-rank completion, rank {best_rank}"),
]
for ax, (picture, title) in zip(axes[:3], panels, strict=True):
    ax.imshow(picture, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
ax = axes[3]
ax.plot(ranks, validation_rmse, "o-", label="validation (held-out visible)")
ax.plot(ranks, erased_rmse, "s--", label="erased pixels (truth)")
ax.axhline(baseline, color="gray", linestyle=":", label="column means")
ax.set_xscale("log", base=2)
ax.set_xlabel("rank")
ax.set_ylabel("RMSE")
ax.legend(fontsize=8)
ax.set_title("choosing the rank")
fig.tight_layout()
plt.show()
