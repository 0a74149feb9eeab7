"""
=================================================
Pruning hidden units with group sparsity
=================================================

A group lasso on each hidden unit's incoming weights (and bias) drives whole units
to exactly zero: after every optimizer step :class:`~skreg.nets.GroupSparsity`
applies the proximal map ``w_g <- max(0, 1 - lr * lambda / ||w_g||) w_g``. Zero
units can then be removed, giving a smaller network that computes the same
function (:meth:`~skreg.nets.MLP.prune`).

We sweep ``lambda`` on an MLP with two hidden layers of 128 units on scikit-learn's
digits and plot the held-out accuracy against the fraction of units pruned.
"""

# %%
# The sweep
# ---------
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skreg.nets import GroupSparsity, RegularizedNetClassifier

torch.set_num_threads(1)

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.3, stratify=y, random_state=0)

strengths = [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]
pruned_fraction, accuracy, sizes = [], [], []
for strength in strengths:
    net = RegularizedNetClassifier(
        module__hidden_units=(128, 128), lr=3e-3, max_epochs=30, random_state=0,
        regularizers=[GroupSparsity(strength=strength)], device="cpu",
    ).fit(X_train, y_train)
    small = net.module_.prune()
    inputs = torch.as_tensor(X_test)
    with torch.no_grad():
        same = torch.allclose(small(inputs), net.module_(inputs), atol=1e-5)
    pruned_fraction.append(1 - sum(small.hidden_units) / 256)
    accuracy.append(net.score(X_test, y_test))
    sizes.append(small.hidden_units)
    print(f"lambda {strength:>4g}: hidden units {small.hidden_units}, "
          f"pruned {pruned_fraction[-1]:.0%}, test accuracy {accuracy[-1]:.3f}, "
          f"pruned net gives the same outputs: {same}")

# %%
# Accuracy against the fraction of units removed
# ----------------------------------------------
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(np.array(pruned_fraction) * 100, accuracy, "o-")
for i, (fraction, acc, strength, size) in enumerate(
        zip(pruned_fraction, accuracy, strengths, sizes, strict=True)):
    # Alternate above/below so neighbouring labels do not overlap.
    ax.annotate(f"lambda={strength:g}\n{size}", (fraction * 100, acc),
                textcoords="offset points", xytext=(4, -22 if i % 2 else 6),
                fontsize=7)
ax.set_xlabel("hidden units pruned (%)")
ax.set_ylabel("test accuracy")
ax.set_title("GroupSparsity on an MLP (128, 128), digits")
fig.tight_layout()
plt.show()
