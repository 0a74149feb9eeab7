"""The nets' section of ``python -m skreg``: each regularizer's strength tuned by
``GridSearchCV`` over a ``Pipeline`` on scikit-learn's bundled data."""

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, StandardScaler

from skreg.datasets import make_noisy_labels
from skreg.utils._demo import run_search

from ._modules import SmallCNN
from ._net import RegularizedNetClassifier, RegularizedNetRegressor
from ._regularizers import (
    ConvOrthogonality,
    EarlyLearningRegularization,
    GroupSparsity,
    SoftOrthogonality,
)

__all__ = ["run_demo"]


def run_demo(device, quick):
    """Fit the nets' searches; return one :class:`~skreg.utils._demo.DemoRow`
    per search."""
    X, y = load_digits(return_X_y=True)
    if quick:
        X, y = X[:600], y[:600]
    epochs = 10 if quick else 20
    cv = 2 if quick else 3
    common = {"lr": 1e-2 if quick else 3e-3, "max_epochs": epochs, "random_state": 0,
              "device": device}
    rows = []

    net = RegularizedNetClassifier(
        module__hidden_units=(64,), regularizers=[SoftOrthogonality()], **common)
    grid = {"regularizednetclassifier__regularizers__soft_orthogonality__strength":
            [0.0, 1e-2] if quick else [0.0, 1e-3, 1e-2]}
    search = GridSearchCV(make_pipeline(MinMaxScaler(), net), grid, cv=cv)
    rows.append(run_search("nets", "RegularizedNetClassifier + SoftOrthogonality",
                           f"digits {X.shape[0]}x64", search, X, y, device=device,
                           metric="accuracy"))

    y_noisy, _ = make_noisy_labels(y, 0.4, random_state=0)
    net = RegularizedNetClassifier(
        module__hidden_units=(128,), regularizers=[EarlyLearningRegularization()],
        **common)
    grid = {"regularizednetclassifier__regularizers__elr__strength": [0.0, 3.0]}
    search = GridSearchCV(make_pipeline(MinMaxScaler(), net), grid, cv=cv)
    rows.append(run_search("nets", "RegularizedNetClassifier + ELR",
                           f"digits {X.shape[0]}x64, 40% label noise", search, X,
                           y_noisy, device=device,
                           metric="accuracy on noisy labels"))

    X_reg, y_reg = load_diabetes(return_X_y=True)
    net = RegularizedNetRegressor(
        module__hidden_units=(64,), regularizers=[GroupSparsity()],
        **{**common, "lr": 1e-2})
    model = TransformedTargetRegressor(make_pipeline(StandardScaler(), net),
                                       transformer=StandardScaler())
    grid = {"regressor__regularizednetregressor__regularizers__group_sparsity__"
            "strength": [0.0, 0.3] if quick else [0.0, 0.1, 0.3, 1.0]}
    search = GridSearchCV(model, grid, cv=cv)
    rows.append(run_search("nets", "RegularizedNetRegressor + GroupSparsity",
                           "diabetes 442x10", search, X_reg, y_reg, device=device,
                           metric="r2"))

    if not quick:
        images = (X / 16.0).astype(np.float32)
        net = RegularizedNetClassifier(
            SmallCNN, module__channels=(8, 16),
            regularizers=[ConvOrthogonality()], **{**common, "max_epochs": 15})
        grid = {"regularizers__conv_orthogonality__strength": [0.0, 0.1]}
        search = GridSearchCV(net, grid, cv=cv)
        rows.append(run_search("nets", "RegularizedNetClassifier(SmallCNN) + "
                               "ConvOrthogonality", "digits 1797x8x8", search,
                               images, y, device=device, metric="accuracy"))
    return rows
