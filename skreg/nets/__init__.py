"""Regularized neural nets on skorch: orthogonality, early-learning
regularization and structured sparsity, as scikit-learn estimators."""

from ._modules import MLP, SmallCNN
from ._net import RegularizedNetClassifier, RegularizedNetRegressor
from ._regularizers import (
    ConvOrthogonality,
    EarlyLearningRegularization,
    GroupSparsity,
    Regularizer,
    SoftOrthogonality,
    conv_singular_values,
    orthogonality_errors,
)

__all__ = [
    "MLP",
    "ConvOrthogonality",
    "EarlyLearningRegularization",
    "GroupSparsity",
    "RegularizedNetClassifier",
    "RegularizedNetRegressor",
    "Regularizer",
    "SmallCNN",
    "SoftOrthogonality",
    "conv_singular_values",
    "orthogonality_errors",
]
