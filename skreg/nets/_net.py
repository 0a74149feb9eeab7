"""skorch nets that behave as scikit-learn estimators and train with regularizers."""

import contextlib
import copy
import inspect
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import _fit_context, clone
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    Options,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import _check_y, check_is_fitted, validate_data
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import EpochScoring, EpochTimer, PassthroughScoring, PrintLog
from skorch.dataset import Dataset as SkorchDataset
from torch import nn
from torch.utils.data import DataLoader, Subset

from skreg._device import resolve_device

from ._modules import MLP, _check_tol
from ._regularizers import Regularizer

__all__ = ["RegularizedNetClassifier", "RegularizedNetRegressor"]

_INPUT_KEY = "X"
_INDEX_KEY = "sample_index"


def _as_float32(values, name):
    """``values`` as a C-contiguous float32 array, or a ValueError where the
    cast overflows (the module computes in float32)."""
    with np.errstate(over="ignore"):
        out = np.require(values, dtype=np.float32, requirements=["C", "W"])
    if not np.isfinite(out).all():
        raise ValueError(
            f"{name} has values beyond float32's range (about 3.4e38 in absolute "
            f"value); the nets compute in float32. Rescale {name}, e.g. with "
            "StandardScaler.")
    return out


class _ArrayBatches(torch.utils.data.Dataset):
    """Arrays served a whole batch per fetch (one fancy index per batch instead of
    one Python call and one tensor per sample, which dominate small nets).

    ``X`` is an array or a dict of arrays; ``.X``/``.y`` let skorch's
    ``data_from_dataset`` read the data back (e.g. for validation scoring).
    """

    def __init__(self, X, y=None):
        self.X = X
        self.y = y
        first = X[_INPUT_KEY] if isinstance(X, Mapping) else X
        self._n_samples = len(first)

    def __len__(self):
        return self._n_samples

    def __getitems__(self, indices):
        index = np.asarray(indices)
        if isinstance(self.X, Mapping):
            X = {key: torch.as_tensor(value[index]) for key, value in self.X.items()}
        else:
            X = torch.as_tensor(self.X[index])
        y = None if self.y is None else torch.as_tensor(self.y[index])
        return X, y

    def __getitem__(self, i):
        X, y = self.__getitems__([i])
        X = {k: v[0] for k, v in X.items()} if isinstance(X, dict) else X[0]
        return X, (torch.zeros(1) if y is None else y[0])


def _batch_as_is(batch):
    return batch


def _encoded_accuracy(net, X, y):
    """Validation accuracy in the encoded label space skorch trains in."""
    y_pred = net.forward(X).argmax(dim=1).cpu().numpy()
    return float(np.mean(y_pred == np.asarray(y)))


def _named_regularizers(regularizers):
    """``(name, regularizer)`` pairs from a list of regularizers or of pairs."""
    if regularizers is None:
        return []
    if not isinstance(regularizers, list | tuple):
        raise TypeError(
            "regularizers must be None or a list of Regularizer instances or of "
            f"(name, Regularizer) pairs, got {type(regularizers).__name__}."
        )
    named = []
    for item in regularizers:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, regularizer = item
        else:
            name, regularizer = getattr(item, "default_name", None), item
        if not isinstance(regularizer, Regularizer):
            raise TypeError(
                "each entry of regularizers must be a Regularizer (e.g. "
                "SoftOrthogonality(...)) or a (name, Regularizer) pair, got "
                f"{item!r}."
            )
        if not name or "__" in name:
            raise ValueError(f"regularizer names must be non-empty without '__': "
                             f"{name!r}.")
        named.append((name, regularizer))
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"regularizer names must be unique, {duplicates} repeat; pass "
            "(name, Regularizer) pairs to name them."
        )
    return named


# The components skorch registers as parameter prefixes when it initializes a net.
_COMPONENTS = {"module", "criterion", "optimizer"}

_COMMON_CONSTRAINTS = {
    "module": [type, HasMethods(["forward"]), callable],
    "criterion": [type, HasMethods(["forward"]), callable],
    "optimizer": [type, callable],
    "lr": [Interval(Real, 0, None, closed="neither")],
    "max_epochs": [Interval(Integral, 0, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left"),
                   Options(Integral, {-1})],
    "regularizers": [list, tuple, None],
    "random_state": ["random_state"],
    "device": [str, torch.device],
    "verbose": ["verbose"],
    "warm_start": ["boolean"],
    "predict_nonlinearity": [StrOptions({"auto"}), callable, None],
}


class _RegularizedNetMixin:
    """What both nets share: validation, seeding, device resolution, regularizers.

    skorch reads ``self.device`` in many places; the user's value (``"auto"``
    included) is kept as the parameter and swapped for the resolved device only
    while the net computes (:meth:`_on_device`).
    """

    # Names ending in "_" are fitted state and names starting with "_" are skorch
    # internals (e.g. _params_to_validate); neither is a parameter.
    def _get_param_names(self):
        return [key for key in self.__dict__
                if not key.endswith("_") and not key.startswith("_")]

    @contextlib.contextmanager
    def _on_device(self):
        requested = self.__dict__["device"]
        self.__dict__["device"] = str(resolve_device(requested))
        try:
            yield
        finally:
            self.__dict__["device"] = requested

    def _validate_params(self):
        # skorch's own check of the ``prefix__name`` arguments (unknown names,
        # ``optimizer_lr`` for ``optimizer__lr``) needs the module, criterion and
        # optimizer registered as prefixes. They are at the end of initialize(),
        # where skorch calls this method, so the first fit checks there; before
        # it, ``module__hidden_units`` would look unknown.
        if self.initialized_ or _COMPONENTS <= set(self.prefixes_):
            super()._validate_params()
        validate_parameter_constraints(
            self._parameter_constraints, self.get_params(deep=False),
            caller_name=type(self).__name__,
        )
        for name, regularizer in _named_regularizers(self.regularizers):
            regularizer.validate()
            self._check_regularizer(name, regularizer)

    def _check_regularizer(self, name, regularizer):
        """Raise if ``regularizer`` cannot apply to this kind of net."""

    def get_params(self, deep=True, **kwargs):
        params = super().get_params(deep=deep, **kwargs)
        if deep and isinstance(self.__dict__.get("regularizers"), list | tuple):
            with contextlib.suppress(TypeError, ValueError):
                for name, regularizer in _named_regularizers(self.regularizers):
                    prefix = f"regularizers__{name}"
                    params[prefix] = regularizer
                    for key, value in regularizer.get_params().items():
                        params[f"{prefix}__{key}"] = value
        return params

    def set_params(self, **params):
        routed = {key: params.pop(key) for key in list(params)
                  if key.startswith("regularizers__")}
        if "device" in params:
            # Set before the device context below, which restores the old value.
            self.__dict__["device"] = params.pop("device")
        if "callbacks" in params:
            # skorch builds the callbacks at once; like any other parameter they
            # are only checked when the net is (re)initialized.
            self.__dict__["callbacks"] = params.pop("callbacks")
            if self.initialized_:
                self._initialize_callbacks()
        if self.initialized_:
            # skorch re-initializes the module on the device for module__ params.
            with self._on_device():
                super().set_params(**params)
        else:
            super().set_params(**params)
        if "regularizers" in params and hasattr(self, "regularizers_"):
            # A later partial_fit (or warm fit) trains with what regularizers_
            # holds: the new list, fresh.
            self.regularizers_ = [(name, clone(reg)) for name, reg in
                                  _named_regularizers(self.regularizers)]
        if routed:
            self._set_regularizer_params(routed)
        return self

    def _set_regularizer_params(self, routed):
        # Whole regularizers first (``regularizers__<name>``, as a Pipeline step
        # is replaced), then their parameters, so set_params(**get_params())
        # round-trips.
        keys = sorted(routed, key=lambda key: key.count("__"))
        for key in keys:
            named = dict(_named_regularizers(self.regularizers))
            name, _, param = key[len("regularizers__"):].partition("__")
            if name not in named:
                raise ValueError(
                    f"Invalid parameter {key!r}: regularizers are named "
                    f"{sorted(named)}; use regularizers__<name> or "
                    "regularizers__<name>__<param>."
                )
            if param:
                named[name].set_params(**{param: routed[key]})
                fitted = dict(getattr(self, "regularizers_", []))
                if name in fitted:
                    fitted[name].set_params(**{param: routed[key]})
            else:
                self._replace_regularizer(name, routed[key])

    def _replace_regularizer(self, name, regularizer):
        """Put ``regularizer`` in the place of the one named ``name``, keeping the
        name (and, on a fitted net, swapping a fresh copy into the training)."""
        if not isinstance(regularizer, Regularizer):
            raise TypeError(
                f"regularizers__{name} must be a Regularizer (e.g. "
                f"SoftOrthogonality(...)), got {regularizer!r}."
            )
        entries = list(self.regularizers)
        for i, (entry_name, _) in enumerate(_named_regularizers(entries)):
            if entry_name == name:
                keeps_name = (not isinstance(entries[i], tuple)
                              and getattr(regularizer, "default_name", None) == name)
                entries[i] = regularizer if keeps_name else (name, regularizer)
        self.regularizers = type(self.regularizers)(entries)
        if hasattr(self, "regularizers_"):
            self.regularizers_ = [
                (entry_name, clone(regularizer) if entry_name == name else fitted)
                for entry_name, fitted in self.regularizers_]

    def __sklearn_is_fitted__(self):
        return bool(self.initialized_) and hasattr(self, "n_features_in_")

    def __setstate__(self, state):
        # skorch maps the saved tensors to ``state["device"]``; give it a concrete
        # device of this machine and keep the user's value as the parameter.
        requested = state["device"]
        if isinstance(requested, str) and requested.strip().lower() == "auto":
            state["device"] = str(resolve_device("auto"))
            super().__setstate__(state)
            self.__dict__["device"] = requested
        else:
            super().__setstate__(state)

    @property
    def _default_callbacks(self):
        callbacks = [
            ("epoch_timer", EpochTimer()),
            ("train_loss", PassthroughScoring(name="train_loss", on_train=True)),
            ("train_data_loss",
             PassthroughScoring(name="train_data_loss", on_train=True)),
            ("train_penalty", PassthroughScoring(name="train_penalty", on_train=True)),
            ("valid_loss", PassthroughScoring(name="valid_loss")),
        ]
        callbacks += self._extra_default_callbacks()
        callbacks.append(("print_log", PrintLog()))
        return callbacks

    def _extra_default_callbacks(self):
        return []

    def check_data(self, X, y=None):
        # Labels are validated and encoded before skorch sees them.
        pass

    def get_dataset(self, X, y=None):
        plain_arrays = isinstance(X, np.ndarray) or (
            isinstance(X, Mapping)
            and all(isinstance(v, np.ndarray) for v in X.values()))
        if (self.dataset is SkorchDataset and plain_arrays
                and not self.get_params_for("dataset")):
            return _ArrayBatches(X, y)
        return super().get_dataset(X, y)

    def get_iterator(self, dataset, training=False):
        prefix = "iterator_train" if training else "iterator_valid"
        iterator = getattr(self, prefix)
        kwargs = self.get_params_for(prefix)
        kwargs.setdefault("batch_size", self.batch_size)
        if kwargs["batch_size"] == -1:
            kwargs["batch_size"] = len(dataset)
        if training:
            kwargs.setdefault("shuffle", True)
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        if isinstance(base, _ArrayBatches) and iterator is DataLoader:
            kwargs.setdefault("collate_fn", _batch_as_is)
        return iterator(dataset, **kwargs)

    def initialize(self):
        self.regularizers_ = [(name, clone(reg)) for name, reg in
                              _named_regularizers(self.regularizers)]
        with self._on_device():
            return super().initialize()

    def initialize_module(self):
        kwargs = self.get_params_for("module")
        if isinstance(self.module, nn.Module):
            module = copy.deepcopy(self.module)
            if kwargs:
                factory = type(module)
                module = factory(**{**self._inferred_sizes(factory), **kwargs})
            else:
                # A fresh fit starts from fresh weights, not the last fit's.
                for layer in module.modules():
                    if hasattr(layer, "reset_parameters"):
                        layer.reset_parameters()
        else:
            module = self.module(**{**self._inferred_sizes(self.module), **kwargs})
        self.module_ = module
        return self

    def _inferred_sizes(self, factory):
        if not hasattr(self, "n_features_in_"):
            raise ValueError(
                f"{type(self).__name__} infers the module's sizes from the data; "
                "call fit instead of initialize."
            )
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            return {}
        sizes = {"n_features": self.n_features_in_, "n_outputs": self._n_outputs()}
        return {key: value for key, value in sizes.items() if key in accepted}

    def infer(self, x, **fit_params):
        if isinstance(x, Mapping) and _INDEX_KEY in x:
            x = x[_INPUT_KEY]
        return super().infer(x, **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        data_loss = super().get_loss(y_pred, y_true, X=X, training=training)
        if not training:
            return data_loss
        index = X.get(_INDEX_KEY) if isinstance(X, Mapping) else None
        terms = [regularizer.penalty(self.module_, y_pred=y_pred, sample_index=index)
                 for _, regularizer in self.regularizers_]
        terms = [term for term in terms if term is not None]
        penalty = torch.stack(terms).sum() if terms else torch.zeros_like(data_loss)
        # Kept on the device until the epoch ends: one host sync per epoch, not
        # one per batch.
        self._batch_terms = torch.stack([data_loss.detach(), penalty.detach()])
        return data_loss + penalty

    def on_epoch_begin(self, net, **kwargs):
        super().on_epoch_begin(net, **kwargs)
        self._epoch_terms = []

    def on_batch_end(self, net, batch=None, training=False, **kwargs):
        super().on_batch_end(net, batch=batch, training=training, **kwargs)
        if training:
            self._epoch_terms.append(self.__dict__.pop("_batch_terms"))

    def on_epoch_end(self, net, **kwargs):
        terms = self.__dict__.pop("_epoch_terms", [])
        values = torch.stack(terms).tolist() if terms else []
        batches = [b for b in self.history[-1]["batches"] if "train_loss" in b]
        for batch, (data_loss, penalty) in zip(batches, values, strict=True):
            batch["train_data_loss"] = data_loss
            batch["train_penalty"] = penalty
        super().on_epoch_end(net, **kwargs)

    def train_step(self, batch, **fit_params):
        step = super().train_step(batch, **fit_params)
        if self.regularizers_:
            lr = self.optimizer_.param_groups[0]["lr"]
            for _, regularizer in self.regularizers_:
                regularizer.after_step(self.module_, lr=lr)
        return step

    def _check_X(self, X, reset):
        X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        return _as_float32(X, "X")

    def _train(self, X, y, rng, routing_method, fit_params):
        """Run skorch's training loop on validated float32 ``X`` and encoded ``y``."""
        seed = int(rng.randint(0, 2**31 - 1))
        with self._on_device():
            device = torch.device(self.device)
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                if not self.initialized_ or (
                        routing_method == "fit" and not self.warm_start):
                    self.initialize()
                generator = torch.Generator(device=device).manual_seed(seed)
                needs_index = False
                for _, regularizer in self.regularizers_:
                    regularizer.prepare(self.module_, n_samples=X.shape[0],
                                        n_outputs=self._n_outputs(), device=device,
                                        generator=generator)
                    needs_index = needs_index or regularizer.needs_sample_index
                if needs_index:
                    X = {_INPUT_KEY: X, _INDEX_KEY: np.arange(X.shape[0])}
                super().partial_fit(X, y, _routing_method=routing_method,
                                    **fit_params)
        return self

    def _fit(self, X, y, *, reset, routing_method, fit_params, classes=None):
        resolve_device(self.device)
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y "
                "is None."
            )
        # A warm refit keeps the module, so its inputs and outputs must not change.
        warm = reset and self.warm_start and self.__sklearn_is_fitted__()
        X, y = self._validate_fit_data(X, y, reset and not warm, classes, warm=warm)
        X = _as_float32(X, "X")
        rng = check_random_state(self.random_state)
        self._train(X, y, rng, routing_method, fit_params)
        # skorch trains on whatever the loss gives: a diverged run would
        # otherwise predict NaN, or keep its initial weights (an infinite
        # loss), without a word.
        loss = self.history[-1, "train_loss"] if len(self.history) else 0.0
        if not (np.isfinite(loss) and all(bool(torch.isfinite(p).all())
                                           for p in self.module_.parameters())):
            raise ValueError(
                f"{type(self).__name__} diverged: the training loss or the "
                "module's weights became NaN or infinite. Lower lr, or scale X "
                "and (for a regressor) y, e.g. with StandardScaler.")
        return self

    def _forward_numpy(self, X):
        # torch's DataLoader draws a seed from the global generator even when it
        # does not shuffle; prediction should not move it.
        with self._on_device(), torch.random.fork_rng(devices=[]):
            out = super().predict_proba(X)
        if not np.isfinite(out).all():
            raise ValueError(
                "The module's output is NaN or infinite on this X: it computes in "
                "float32, which X's values overflowed. Scale X as the training "
                "data were scaled (e.g. with StandardScaler).")
        return out

    def group_sparsity(self, tol=0.0):
        """Fraction of exactly-zero unit groups in each layer.

        A group is one output unit's (or channel's) incoming weights and bias; the
        layers are those of the fitted :class:`GroupSparsity` regularizers, or
        every hidden layer when there is none.

        Parameters
        ----------
        tol : float, default=0.0
            Entries at most ``tol`` in absolute value count as zero; a
            non-negative number.

        Returns
        -------
        dict
            Layer name to the fraction of groups whose entries are all at most
            ``tol`` in absolute value.
        """
        check_is_fitted(self)
        from ._regularizers import GroupSparsity, _select_layers

        _check_tol(tol)

        layers = {}
        for _, regularizer in self.regularizers_:
            if isinstance(regularizer, GroupSparsity):
                layers.update(regularizer._groups(self.module_))
        if not layers:
            layers = dict(_select_layers(self.module_, (nn.Linear, nn.Conv2d),
                                         "hidden"))
        report = {}
        with torch.no_grad():
            for name, layer in layers.items():
                rows = layer.weight.reshape(layer.weight.shape[0], -1).abs()
                dead = (rows <= tol).all(dim=1)
                if layer.bias is not None:
                    dead &= layer.bias.abs() <= tol
                report[name] = float(dead.float().mean())
        return report


_SHARED_DOC = """
    Parameters
    ----------
    module : torch.nn.Module class or instance, default=MLP
        The network. A class is built with ``n_features`` and ``n_outputs``
        inferred from the data (when its signature has them) plus every
        ``module__<name>`` argument, e.g. ``module__hidden_units=(64, 64)``.
    criterion : torch loss class, default={criterion}
    optimizer : torch optimizer class, default=torch.optim.Adam
        Its arguments are ``optimizer__<name>``, e.g. ``optimizer__weight_decay``.
    lr : float, default=1e-3
        Learning rate.
    max_epochs : int, default={max_epochs}
    batch_size : int, default=128
        ``-1`` means full batch.
    regularizers : list of Regularizer or of (name, Regularizer), default=None
        E.g. ``[SoftOrthogonality(1e-2), EarlyLearningRegularization()]``. Their
        parameters are ``regularizers__<name>__<param>`` (the name defaults to
        the class's ``default_name``, e.g. ``soft_orthogonality``, ``elr``), and
        ``regularizers__<name>`` replaces a whole regularizer (keeping its name),
        so ``GridSearchCV`` can tune them. A regularizer that finds no layer to
        act on warns and adds 0.
    train_split : callable, default=None
        skorch's internal validation split; ``None`` trains on all the data
        (tune with scikit-learn's cross-validation instead).
    callbacks : list of skorch callbacks, default=None
    predict_nonlinearity : "auto", callable or None, default="auto"
        Applied to the module's output by ``predict``/``predict_proba``; "auto"
        is the softmax for ``CrossEntropyLoss`` and the identity otherwise.
    warm_start : bool, default=False
        When True, ``fit`` continues from the current weights instead of
        re-initializing the module; it then raises a ``ValueError`` if the
        number of features, the classes or the number of outputs changed.
    random_state : int, RandomState instance or None, default=None
        Seeds torch (weights, shuffling, dropout) for each fit, without touching
        torch's global random state, so a refit is identical.
    device : {{"auto", "cpu", "cuda", "cuda:N"}} or torch.device, default="auto"
        Where the module computes; ``"auto"`` picks CUDA when available.
    verbose : int, default=0
        ``1`` prints skorch's per-epoch table.
    **kwargs
        Any other skorch argument: ``module__*``, ``optimizer__*``,
        ``iterator_train__*`` (training batches are shuffled unless
        ``iterator_train__shuffle`` is given), ``callbacks__*``, ...
"""


class RegularizedNetClassifier(_RegularizedNetMixin, NeuralNetClassifier):
    __doc__ = """Neural network classifier (skorch) trained with regularizers.

    Labels of any type are mapped through ``classes_``; ``X`` may be float64 or
    float32 (the module computes in float32); the loss recorded in ``history``
    is split into ``train_data_loss`` and ``train_penalty``.
""" + _SHARED_DOC.format(criterion="torch.nn.CrossEntropyLoss",
                         max_epochs=50) + """    classes : array-like, default=None
        All the labels, when ``y`` may miss some; by default those of ``y``.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The labels, in the order of the module's outputs.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when ``X`` has string column names.
    module_ : torch.nn.Module
        The trained network.
    regularizers_ : list of (str, Regularizer)
        The trained regularizers with their state (e.g. ELR targets).
    history_ : skorch.History

    Notes
    -----
    Each regularizer's penalty is added to the mini-batch loss; proximal ones
    (:class:`GroupSparsity`) act after each optimizer step. The module outputs
    logits; ``predict_proba`` applies the softmax.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skreg.nets import RegularizedNetClassifier, SoftOrthogonality
    >>> X, y = load_iris(return_X_y=True)
    >>> net = RegularizedNetClassifier(
    ...     module__hidden_units=(16,), lr=1e-2, max_epochs=30, random_state=0,
    ...     regularizers=[SoftOrthogonality(strength=1e-2)], device="cpu")
    >>> net.fit(X, y).score(X, y) > 0.9
    True
    >>> sorted(net.history[-1])[:3]
    ['batches', 'dur', 'epoch']
    """

    _parameter_constraints = {**_COMMON_CONSTRAINTS, "classes": ["array-like", None]}

    def __init__(self, module=MLP, *, criterion=nn.CrossEntropyLoss,
                 optimizer=torch.optim.Adam, lr=1e-3, max_epochs=50, batch_size=128,
                 regularizers=None, train_split=None, callbacks=None,
                 predict_nonlinearity="auto", warm_start=False, verbose=0,
                 random_state=None, device="auto", classes=None, **kwargs):
        super().__init__(
            module, criterion=criterion, optimizer=optimizer, lr=lr,
            max_epochs=max_epochs, batch_size=batch_size, train_split=train_split,
            callbacks=callbacks, predict_nonlinearity=predict_nonlinearity,
            warm_start=warm_start, verbose=verbose, device=device, classes=classes,
            **kwargs,
        )
        self.regularizers = regularizers
        self.random_state = random_state

    def _extra_default_callbacks(self):
        return [("valid_acc", EpochScoring(_encoded_accuracy, name="valid_acc",
                                           lower_is_better=False))]

    def _n_outputs(self):
        return len(self.classes_)

    def _encode(self, y, reset, classes=None, warm=False):
        y = _check_y(y) if reset or warm else y
        check_classification_targets(y)
        if reset or warm:
            labels = self.classes if self.classes is not None else classes
            encoder = LabelEncoder().fit(y if labels is None else labels)
            if len(encoder.classes_) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs at least two classes in y, got "
                    f"one class: {encoder.classes_[0]!r}."
                )
            if warm and not np.array_equal(encoder.classes_, self.classes_):
                raise ValueError(
                    "warm_start=True keeps the module, whose outputs are the "
                    f"classes {self.classes_.tolist()} of the previous fit, but y "
                    f"has the classes {encoder.classes_.tolist()}; pass "
                    "classes=<all labels>, or refit with warm_start=False."
                )
            self.classes_inferred_ = encoder.classes_
        unseen = np.setdiff1d(np.unique(y), self.classes_)
        if unseen.size:
            raise ValueError(
                f"y has labels {unseen.tolist()} not among classes_ "
                f"{self.classes_.tolist()}."
            )
        return np.searchsorted(self.classes_, y).astype(np.int64)

    @property
    def classes_(self):
        try:
            return self.classes_inferred_
        except AttributeError as exc:
            raise AttributeError(
                f"{type(self).__name__} has no classes_ before fit."
            ) from exc

    def _validate_fit_data(self, X, y, reset, classes, warm=False):
        X, y = validate_data(self, X, y, reset=reset, dtype=[np.float64, np.float32])
        return X, self._encode(y, reset=reset, classes=classes, warm=warm)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, **fit_params):
        """Initialize the module and train it on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Labels of any type with at least two classes.
        **fit_params
            Passed to the module's ``forward`` by skorch.

        Returns
        -------
        self
        """
        return self._fit(X, y, reset=True, routing_method="fit",
                         fit_params=fit_params)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, classes=None, **fit_params):
        """Train for ``max_epochs`` more epochs without re-initializing.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : array-like, default=None
            All the labels, needed on the first call when ``y`` misses some.
        **fit_params
            Passed to the module's ``forward``.

        Returns
        -------
        self
        """
        return self._fit(X, y, reset=not self.__sklearn_is_fitted__(),
                         routing_method="partial_fit", fit_params=fit_params,
                         classes=classes)

    def predict_proba(self, X):
        """Class probabilities, columns in the order of ``classes_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self._forward_numpy(self._check_X(X, reset=False))

    def predict(self, X):
        """Predicted labels (of the same type as the training labels).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.classifier_tags.multi_class = True
        return tags


class RegularizedNetRegressor(_RegularizedNetMixin, NeuralNetRegressor):
    __doc__ = """Neural network regressor (skorch) trained with regularizers.

    ``y`` may have one or several columns; ``X`` may be float64 or float32 (the
    module computes in float32); the loss recorded in ``history`` is split into
    ``train_data_loss`` and ``train_penalty``.
""" + _SHARED_DOC.format(criterion="torch.nn.MSELoss", max_epochs=100) + """
    Attributes
    ----------
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when ``X`` has string column names.
    n_outputs_ : int
        Number of target columns.
    module_ : torch.nn.Module
        The trained network.
    regularizers_ : list of (str, Regularizer)
        The trained regularizers with their state.
    history_ : skorch.History

    Notes
    -----
    Each regularizer's penalty is added to the mini-batch loss; proximal ones
    (:class:`GroupSparsity`) act after each optimizer step.
    :class:`EarlyLearningRegularization` needs class scores and is rejected
    here. Scale ``X`` and ``y`` (e.g. with ``StandardScaler`` and
    ``TransformedTargetRegressor``): the default learning rate assumes
    unit-scale data.

    Examples
    --------
    >>> import numpy as np
    >>> from skreg.nets import GroupSparsity, RegularizedNetRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((200, 5))
    >>> y = X @ np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    >>> net = RegularizedNetRegressor(
    ...     module__hidden_units=(32,), lr=1e-2, max_epochs=100, random_state=0,
    ...     regularizers=[GroupSparsity(strength=1e-3)], device="cpu")
    >>> net.fit(X, y).score(X, y) > 0.95
    True
    """

    _parameter_constraints = dict(_COMMON_CONSTRAINTS)

    def __init__(self, module=MLP, *, criterion=nn.MSELoss,
                 optimizer=torch.optim.Adam, lr=1e-3, max_epochs=100, batch_size=128,
                 regularizers=None, train_split=None, callbacks=None,
                 predict_nonlinearity="auto", warm_start=False, verbose=0,
                 random_state=None, device="auto", **kwargs):
        super().__init__(
            module, criterion=criterion, optimizer=optimizer, lr=lr,
            max_epochs=max_epochs, batch_size=batch_size, train_split=train_split,
            callbacks=callbacks, predict_nonlinearity=predict_nonlinearity,
            warm_start=warm_start, verbose=verbose, device=device, **kwargs,
        )
        self.regularizers = regularizers
        self.random_state = random_state

    def _n_outputs(self):
        return self.n_outputs_

    def _validate_fit_data(self, X, y, reset, classes, warm=False):
        X, y = validate_data(self, X, y, reset=reset, multi_output=True,
                             y_numeric=True, dtype=[np.float64, np.float32])
        y = _as_float32(y, "y")
        n_outputs = 1 if y.ndim == 1 else y.shape[1]
        if reset:
            self.n_outputs_ = n_outputs
        elif n_outputs != self.n_outputs_:
            hint = (" warm_start=True keeps the module and its outputs; refit with "
                    "warm_start=False to change them." if warm else "")
            raise ValueError(
                f"y has {n_outputs} column(s) but {type(self).__name__} was fitted "
                f"with {self.n_outputs_}.{hint}"
            )
        if reset or warm:
            self.target_ndim_ = y.ndim
        return X, y.reshape(-1, n_outputs)

    def _check_regularizer(self, name, regularizer):
        if regularizer.needs_class_scores:
            raise ValueError(
                f"regularizers: {name!r} ({type(regularizer).__name__}) reads the "
                "module's outputs as class scores and does not apply to "
                f"{type(self).__name__}; use RegularizedNetClassifier."
            )

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, **fit_params):
        """Initialize the module and train it on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        **fit_params
            Passed to the module's ``forward`` by skorch.

        Returns
        -------
        self
        """
        return self._fit(X, y, reset=True, routing_method="fit",
                         fit_params=fit_params)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y, **fit_params):
        """Train for ``max_epochs`` more epochs without re-initializing.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        **fit_params
            Passed to the module's ``forward``.

        Returns
        -------
        self
        """
        return self._fit(X, y, reset=not self.__sklearn_is_fitted__(),
                         routing_method="partial_fit", fit_params=fit_params)

    def predict(self, X):
        """Predicted targets, shaped like the training ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
            float64 values.
        """
        check_is_fitted(self)
        y_pred = self._forward_numpy(self._check_X(X, reset=False))
        y_pred = y_pred.astype(np.float64)
        return y_pred.ravel() if self.target_ndim_ == 1 else y_pred

    @property
    def predict_proba(self):
        """Not available: a regressor has no class probabilities."""
        raise AttributeError(
            f"{type(self).__name__} has no predict_proba; use predict."
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.target_tags.multi_output = True
        return tags
