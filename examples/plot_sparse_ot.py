"""
Sparse transport plans, from one-to-one matching to smooth transport
=====================================================================

Sparsity-constrained optimal transport (Liu, Puigcerver and Blondel, ICLR 2023)
caps the number of sources feeding each target at ``k``. With ``k = 1`` each
target point is fed by a single source (a matching, when gamma is small);
with ``k`` as large as the number of sources it is quadratically regularized
OT, whose plans are already sparse but unevenly so.

The first figure draws the plans for ``k = 1, 2, 5`` and unconstrained between
two small point clouds. The second uses the plan for domain adaptation: a
classifier trained on the source moons fails on the rotated target moons,
and the same classifier trained on the source moons *transported* onto the
target cloud does much better.
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.svm import SVC

from skreg.transport import SparseOTDomainAdaptationClassifier, sparsity_constrained_ot
from skreg.transport._demo import rotated_moons

rng = np.random.RandomState(0)
n = 30
xs = rng.randn(n, 2)
xt = rng.randn(n, 2) * 0.7 + [4.0, 1.0]
C = ((xs[:, None, :] - xt[None, :, :]) ** 2).sum(-1)
a = b = np.full(n, 1.0 / n)
gamma = 0.5 * np.median(C) * n

fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharex=True, sharey=True)
for ax, k in zip(axes, [1, 2, 5, n], strict=True):
    res = sparsity_constrained_ot(a, b, C, k, gamma)
    rows, cols = np.nonzero(res.plan)
    for i, j in zip(rows, cols, strict=True):
        ax.plot([xs[i, 0], xt[j, 0]], [xs[i, 1], xt[j, 1]], "k-",
                alpha=min(1.0, res.plan[i, j] * n), lw=1)
    ax.scatter(*xs.T, c="tab:blue", s=15, label="source")
    ax.scatter(*xt.T, c="tab:orange", s=15, label="target")
    nnz = np.count_nonzero(res.plan, axis=0).max()
    title = "k = inf (quadratic OT)" if k == n else f"k = {k}"
    ax.set_title(f"{title}\nmax nnz/column {nnz}, "
                 f"marginal err {res.marginal_error:.0e}")
axes[0].legend(loc="lower left")
fig.tight_layout()

# %%
# Domain adaptation on rotated moons
# ----------------------------------
# The target is the source distribution rotated by 40 degrees. The baseline is
# an SVC trained on the source alone; the adapted classifier trains the same
# SVC on the source samples moved onto the target cloud by barycentric
# projection of a 2-sparse plan.

Xs, ys, Xt, yt = rotated_moons(150, 150)
baseline = SVC().fit(Xs, ys)
adapted = SparseOTDomainAdaptationClassifier(SVC(), max_nz=2, gamma=0.1,
                                             device="cpu")
adapted.fit(Xs, ys, X_target=Xt)
moved = adapted.transport_.transported_source_

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True, sharey=True)
for ax, model, name in zip(axes, [baseline, adapted],
                           ["SVC on the source", "SVC on transported source"],
                           strict=True):
    grid = np.linspace(-2.5, 3.5, 150)
    xx, yy = np.meshgrid(grid, grid)
    zz = model.predict(np.c_[xx.ravel(), yy.ravel()]).reshape(xx.shape)
    ax.contourf(xx, yy, zz, alpha=0.2, cmap="coolwarm")
    ax.scatter(*Xt.T, c=yt, cmap="coolwarm", s=12, marker="x", label="target")
    if model is adapted:
        ax.scatter(*moved.T, c=ys, cmap="coolwarm", s=8, alpha=0.6,
                   label="transported source")
    else:
        ax.scatter(*Xs.T, c=ys, cmap="coolwarm", s=8, alpha=0.6, label="source")
    ax.set_title(f"{name}: target accuracy {model.score(Xt, yt):.2f}")
    ax.legend(loc="lower left")
fig.tight_layout()
plt.show()
