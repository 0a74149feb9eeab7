"""
=======================================================
Orthogonality against accuracy, dense and convolutional
=======================================================

Orthogonal layers preserve norms: every singular value of the layer is 1, so
signals and gradients neither explode nor vanish through them. Soft penalties
make a layer *nearly* orthogonal; the stronger the penalty, the closer to an
isometry, and at some point the constraint costs accuracy (Achour, Malgouyres and
Mamalet, JMLR 2022, discuss this trade-off for convolutional layers).

We sweep the strength of :class:`~skreg.nets.SoftOrthogonality` on an MLP and of
:class:`~skreg.nets.ConvOrthogonality` on a small CNN, both on scikit-learn's
digits, and report the held-out accuracy with the distance to orthogonality:
``||W^T W - I||_F`` for dense layers, and for the convolutions the range of
singular values of the layer as a circular convolution
(:func:`~skreg.nets.conv_singular_values`, computed exactly by FFT).
"""

# %%
# Dense layers: SoftOrthogonality
# -------------------------------
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skreg.nets import (
    ConvOrthogonality,
    RegularizedNetClassifier,
    SmallCNN,
    SoftOrthogonality,
    conv_singular_values,
    orthogonality_errors,
)

torch.set_num_threads(1)

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.3, stratify=y, random_state=0)

dense_strengths = [0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
dense_error, dense_accuracy = [], []
for strength in dense_strengths:
    net = RegularizedNetClassifier(
        module__hidden_units=(64, 64), lr=3e-3, max_epochs=30, random_state=0,
        regularizers=[SoftOrthogonality(strength=strength)], device="cpu",
    ).fit(X_train, y_train)
    errors = orthogonality_errors(net.module_, layers="hidden")
    dense_error.append(max(errors.values()))
    dense_accuracy.append(net.score(X_test, y_test))
    print(f"SoftOrthogonality {strength:>6g}: max ||W^T W - I||_F "
          f"{dense_error[-1]:.4f}, test accuracy {dense_accuracy[-1]:.3f}")

# %%
# Convolutions: ConvOrthogonality and the layers' spectra
# -------------------------------------------------------
# The second convolution has stride 2; its penalty uses the paper's padding
# ``P = floor((k - 1) / S) S``.
conv_strengths = [0.0, 0.01, 0.1, 1.0]
conv_accuracy, spectra = [], {}
for strength in conv_strengths:
    net = RegularizedNetClassifier(
        SmallCNN, module__channels=(8, 16), lr=3e-3, max_epochs=20, random_state=0,
        regularizers=[ConvOrthogonality(strength=strength)], device="cpu",
    ).fit(X_train, y_train)
    conv_accuracy.append(net.score(X_test, y_test))
    spectra[strength] = conv_singular_values(net.module_, image_size=8)
    ranges = ", ".join(f"{name} [{s.min():.2f}, {s.max():.2f}]"
                       for name, s in spectra[strength].items())
    print(f"ConvOrthogonality {strength:>5g}: test accuracy "
          f"{conv_accuracy[-1]:.3f}; singular values {ranges}")

# %%
# The trade-off
# -------------
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
ax = axes[0]
ax.semilogx([max(s, 1e-4) for s in dense_strengths], dense_error, "o-",
            color="tab:purple")
ax.set_yscale("log")
ax.set_xlabel("SoftOrthogonality strength (0 drawn at 1e-4)")
ax.set_ylabel("max over hidden layers of ||W^T W - I||_F", color="tab:purple")
twin = ax.twinx()
twin.semilogx([max(s, 1e-4) for s in dense_strengths], dense_accuracy, "s--",
              color="tab:green")
twin.set_ylabel("test accuracy", color="tab:green")
ax.set_title("MLP (64, 64)")

ax = axes[1]
for offset, (name, color) in enumerate([("features.0", "tab:orange"),
                                        ("features.2", "tab:blue")]):
    low = [spectra[s][name].min() for s in conv_strengths]
    high = [spectra[s][name].max() for s in conv_strengths]
    positions = np.arange(len(conv_strengths)) + 0.15 * (2 * offset - 1)
    ax.vlines(positions, low, high, color=color, lw=4, label=name)
ax.axhline(1.0, color="k", lw=0.8, ls=":")
ax.set_xticks(range(len(conv_strengths)), [f"{s:g}" for s in conv_strengths])
ax.set_xlabel("ConvOrthogonality strength")
ax.set_ylabel("singular value range (circular conv, 8x8 input)")
ax.set_yscale("log")
ax.legend()
ax.set_title("SmallCNN spectra; accuracy " + ", ".join(
    f"{a:.3f}" for a in conv_accuracy), fontsize=9)

ax = axes[2]
bins = np.linspace(0, max(spectra[0.0]["features.2"].max(), 2.0), 40)
ax.hist(spectra[0.0]["features.2"], bins=bins, alpha=0.6, label="strength 0")
ax.hist(spectra[1.0]["features.2"], bins=bins, alpha=0.6, label="strength 1")
ax.set_xlabel("singular value of the stride-2 conv (features.2)")
ax.set_ylabel("count")
ax.legend()
ax.set_title("towards an isometry")
fig.tight_layout()
plt.show()
