"""Find every public estimator of skreg, as scikit-learn's ``all_estimators`` does."""

import importlib
import inspect

from sklearn.base import ClassifierMixin, ClusterMixin, RegressorMixin, TransformerMixin

__all__ = ["all_estimators"]

_TYPE_MIXINS = {
    "classifier": ClassifierMixin,
    "regressor": RegressorMixin,
    "transformer": TransformerMixin,
    "cluster": ClusterMixin,
}


def _is_estimator_class(obj):
    return (
        inspect.isclass(obj)
        and not inspect.isabstract(obj)
        and callable(getattr(obj, "fit", None))
        and callable(getattr(obj, "get_params", None))
    )


def all_estimators(type_filter=None):
    """List the public estimators of skreg.

    An estimator is public when a family subpackage lists it in ``__all__``.

    Parameters
    ----------
    type_filter : {"classifier", "regressor", "transformer", "cluster"} or list \
            of those, default=None
        Keep only estimators of these kinds; ``None`` keeps all.

    Returns
    -------
    estimators : list of (name, class) tuples
        Sorted by name, without duplicates.

    Examples
    --------
    >>> from skreg.utils.discovery import all_estimators
    >>> isinstance(all_estimators(), list)
    True
    """
    from skreg import FAMILIES

    if type_filter is None:
        kinds = None
    else:
        kinds = [type_filter] if isinstance(type_filter, str) else list(type_filter)
        unknown = sorted(set(kinds) - set(_TYPE_MIXINS))
        if unknown:
            raise ValueError(
                f"type_filter must be None or among {sorted(_TYPE_MIXINS)}, "
                f"got {unknown}."
            )

    found = {}
    for family in FAMILIES:
        module = importlib.import_module(f"skreg.{family}")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if name.startswith("_") or not _is_estimator_class(obj):
                continue
            if kinds is not None and not any(
                issubclass(obj, _TYPE_MIXINS[kind]) for kind in kinds
            ):
                continue
            found[name] = obj
    return sorted(found.items())
