"""Shared shell of the cumulative-logit classifiers: labels, weights, prediction."""

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from skreg._device import resolve_device, to_numpy, to_tensor
from skreg.ordinal._solver import class_log_probabilities, class_probabilities


def ordered_categorical_order(y):
    """The observed categories of an ordered pandas Categorical ``y``, in order.

    ``None`` for anything else (an unordered Categorical included). Categories
    that do not occur in ``y`` are dropped, as labels absent from ``y`` are.
    """
    dtype = getattr(y, "dtype", None)
    if getattr(dtype, "ordered", None) is not True or not hasattr(dtype,
                                                                  "categories"):
        return None
    codes = np.asarray(getattr(y, "cat", y).codes)
    return np.asarray(dtype.categories)[np.unique(codes[codes >= 0])]


def _check_label_types(y):
    """Reject missing labels and labels of mixed types in an object ``y``."""
    if y.dtype != object:
        return
    if any(label is None for label in y):
        raise ValueError("y contains None; every sample needs a class label.")
    try:
        np.unique(y)
    except TypeError as exc:
        kinds = sorted({type(label).__name__ for label in y})
        raise TypeError(
            "y must hold labels of one comparable type (all strings or all "
            f"numbers), got a mix of {kinds}."
        ) from exc


def encode_ordered_labels(y, categories):
    """Map labels to ``0 .. K-1`` in their order; return ``(classes, codes)``.

    Without ``categories`` the order is the sort order of the labels.
    """
    y = np.asarray(y)
    _check_label_types(y)
    check_classification_targets(y)
    if categories is None:
        classes, codes = np.unique(y, return_inverse=True)
    else:
        classes = np.asarray(categories)
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(
                "categories must be a non-empty 1-d list of class labels in "
                f"increasing order, got an array of shape {classes.shape}."
            )
        if np.unique(classes).size != classes.size:
            raise ValueError(
                f"categories must not repeat a label, got {classes.tolist()}."
            )
        order = np.argsort(classes, kind="stable")
        pos = np.searchsorted(classes[order], y)
        pos = np.clip(pos, 0, classes.size - 1)
        unknown = classes[order][pos] != y
        if unknown.any():
            raise ValueError(
                f"y contains labels not named in categories: "
                f"{np.unique(y[unknown]).tolist()}; categories={classes.tolist()}."
            )
        codes = order[pos]
    if classes.size < 2:
        raise ValueError(
            "An ordinal classifier needs at least 2 classes in y; got 1 class "
            f"({classes[0]!r})."
        )
    return classes, codes


def check_ordinal_weights(sample_weight, X, codes, classes):
    """Validate weights (non-negative, every class with positive total weight)."""
    weights = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                   ensure_non_negative=True)
    # relative to the largest weight first, so that the total cannot overflow
    largest = weights.max(initial=0.0)
    if largest > 0:
        weights = weights / largest
    totals = np.bincount(codes, weights=weights, minlength=classes.size)
    empty = totals <= 0
    if empty.all() or np.count_nonzero(~empty) < 2:
        raise ValueError(
            "An ordinal classifier needs at least 2 classes with positive sample "
            "weight; only one class is present."
        )
    if empty.any():
        raise ValueError(
            f"class {classes[empty].tolist()} has no training sample with positive "
            "weight; every class named in categories must be observed in training (its "
            "threshold is not identified otherwise)."
        )
    return weights / weights.sum()


def standardization(X, weights, standardize):
    """Weighted mean and population standard deviation of each column.

    Computed on each column divided by its largest magnitude, so that features
    of any scale (``1e-300`` as ``1e300``) neither underflow nor overflow. A
    column whose spread is below ``1e-12`` of its magnitude is constant: it gets
    a scale of 1 so it stays at zero after centring.
    """
    if not standardize:
        p = X.shape[1]
        return np.zeros(p), np.ones(p)
    size = np.abs(X).max(0, initial=0.0)
    size[size == 0] = 1.0
    unit = X / size
    mean = weights @ unit
    scale = np.sqrt(weights @ np.square(unit - mean))
    return mean * size, np.where(scale <= 1e-12, 1.0, scale * size)


class CumulativeLogitMixin(ClassifierMixin, BaseEstimator):
    """Prediction shared by every model with ``P(y <= k | x) = sigmoid(eta_k)``.

    Subclasses set ``coef_`` (``(K-1, p)`` or ``(p,)``), ``intercept_`` and
    ``classes_``.
    """

    _shared_constraints = {
        "categories": ["array-like", None],
        "device": [str, torch.device],
    }

    def _cumulative_logits(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        device = resolve_device(self.device, fallback=True)
        X_t = to_tensor(X, device)
        coef = to_tensor(np.atleast_2d(self.coef_), device, dtype=X_t.dtype)
        intercept = to_tensor(self.intercept_, device, dtype=X_t.dtype)
        return intercept + X_t @ coef.T, X.dtype

    def decision_function(self, X):
        """Scores whose largest entry is the predicted class.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_classes)
            For two classes, the log-odds of ``classes_[1]``
            (``-(intercept_ + X @ coef_.T)``); otherwise the log class
            probabilities.
        """
        eta, dtype = self._cumulative_logits(X)
        if len(self.classes_) == 2:
            return to_numpy(-eta[:, 0]).astype(dtype, copy=False)
        return to_numpy(class_log_probabilities(eta)).astype(dtype, copy=False)

    def predict_proba(self, X):
        """Class probabilities, in the order of ``classes_``.

        Where the fitted cumulative curves cross, the cumulative probabilities are
        first sorted (monotone rearrangement), so the result is always a valid
        distribution; :meth:`count_crossings` says how often that happened.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        eta, dtype = self._cumulative_logits(X)
        return to_numpy(class_probabilities(eta)).astype(dtype, copy=False)

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`.

        Computed from the cumulative logits directly, so it stays finite where
        the probabilities underflow to 0 far from the training data.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        eta, dtype = self._cumulative_logits(X)
        return to_numpy(class_log_probabilities(eta)).astype(dtype, copy=False)

    def predict(self, X):
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def count_crossings(self, X):
        """Number of rows of ``X`` whose fitted cumulative curves cross.

        Those rows are the ones :meth:`predict_proba` repairs by monotone
        rearrangement.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        int
        """
        eta, _ = self._cumulative_logits(X)
        if eta.shape[1] < 2:
            return 0
        return int((eta[:, 1:] < eta[:, :-1]).any(1).sum())

    def _prepare_fit(self, X, y, sample_weight):
        device = resolve_device(self.device)
        categories = self.categories
        if categories is None:
            # an ordered pandas Categorical carries the order of its classes
            categories = ordered_categorical_order(y)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        self.classes_, codes = encode_ordered_labels(y, categories)
        weights = check_ordinal_weights(sample_weight, X, codes, self.classes_)
        return X, codes, weights, device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        # an ordinal model ranks classes along one (or K-1 nearly parallel)
        # directions; unordered blobs in the plane are outside its model class
        tags.classifier_tags.poor_score = True
        return tags


def finite_fit(coef, intercept, dtype, alpha=None):
    """``(coef, intercept)`` cast to ``dtype``; raise where they are not all finite.

    Checked after the cast: raw-scale coefficients of a tiny float32 feature
    can exceed the float32 range.
    """
    with np.errstate(over="ignore"):
        coef = coef.astype(dtype, copy=False)
        intercept = intercept.astype(dtype, copy=False)
    if np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept)):
        return coef, intercept
    at = "" if alpha is None else f" at alpha={alpha:.4g}"
    raise ValueError(
        f"The fit{at} produced non-finite coefficients (in {np.dtype(dtype).name}); "
        "check the scale of X and of sample_weight, or use a larger alpha."
    )


# The ordinal solvers compute in float64 whatever the input's float type: in
# float32 the rounding of the gradient's sums over samples kept FISTA's KKT
# violation above its floor (1.2e-4) on small data (wine, 178 x 13:
# PrestoClassifierCV ran every penalty to 5000 iterations, 8.7 s, and
# warned; 1.0 s in float64). Fitted attributes and predictions keep the
# input's type.
SOLVER_DTYPE = np.float64


def solver_tolerance(tol):
    """The requested tolerance, floored at what :data:`SOLVER_DTYPE` resolves."""
    return max(tol, 1e3 * float(np.finfo(SOLVER_DTYPE).eps))

