"""Regularizers of the nets: scikit-learn-clonable parameter holders.

A regularizer has no ``fit``: the net clones it at ``initialize`` and calls three
hooks during training: ``prepare`` (once per fit call, to allocate state),
``penalty`` (each batch: a scalar added to the data loss, or ``None``) and
``after_step`` (after each optimizer step, for proximal updates). Its parameters
are reachable from the net as ``regularizers__<name>__<param>``, so
``GridSearchCV`` and ``clone`` see them.
"""

import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, StrOptions
from torch import nn

from ._penalties import (
    circular_conv_singular_values,
    conv_orthogonality_penalty,
    elr_penalty,
    gram_residual,
    group_lasso_prox_,
    group_norms,
    soft_orthogonality_penalty,
    spectral_orthogonality_penalty,
)

__all__ = [
    "ConvOrthogonality",
    "EarlyLearningRegularization",
    "GroupSparsity",
    "Regularizer",
    "SoftOrthogonality",
    "conv_singular_values",
    "orthogonality_errors",
]

_LAYERS_CONSTRAINT = [StrOptions({"hidden", "all"}), list, tuple]


def _select_layers(module, kinds, layers):
    """``(name, layer)`` pairs of the given kinds; ``"hidden"`` drops the module's
    last ``nn.Linear`` (its output layer)."""
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, kinds)]
    if isinstance(layers, str):
        if layers == "all":
            return named
        linear = [name for name, m in module.named_modules()
                  if isinstance(m, nn.Linear)]
        output = linear[-1] if linear else None
        return [(name, m) for name, m in named if name != output]
    by_name = dict(named)
    unknown = [name for name in layers if name not in by_name]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not {'/'.join(k.__name__ for k in kinds)} layers "
            f"of the module; available: {sorted(by_name)}."
        )
    return [(name, by_name[name]) for name in layers]


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


class Regularizer(BaseEstimator):
    """Base class: holds parameters, no ``fit``.

    Subclasses implement :meth:`penalty` and may override :meth:`prepare` and
    :meth:`after_step`. Fitted state lives in attributes ending with ``_``;
    tensors in it are moved to the CPU when pickled, so a model trained on a GPU
    loads on a CPU-only machine.

    Examples
    --------
    A plain weight decay on the output layer, as a custom regularizer:

    >>> from skreg.nets import MLP, Regularizer
    >>> class OutputL2(Regularizer):
    ...     default_name = "output_l2"
    ...     _parameter_constraints = {}
    ...     def __init__(self, strength=1e-3):
    ...         self.strength = strength
    ...     def penalty(self, module, *, y_pred, sample_index):
    ...         return self.strength * module.output.weight.square().sum()
    >>> value = OutputL2(0.5).penalty(MLP(3, 2), y_pred=None, sample_index=None)
    >>> value.ndim
    0
    """

    #: Whether :meth:`penalty` needs each sample's position in the training set.
    needs_sample_index = False
    #: Whether :meth:`penalty` reads ``y_pred`` as class scores (logits), which
    #: only a classifier's module outputs.
    needs_class_scores = False

    def prepare(self, module, *, n_samples, n_outputs, device, generator):
        """Allocate or move state before training on ``n_samples`` samples."""

    def penalty(self, module, *, y_pred, sample_index):
        """The weighted penalty of this batch (a scalar tensor), or ``None``."""
        raise NotImplementedError

    def after_step(self, module, *, lr):
        """Called after each optimizer step (proximal updates go here)."""

    def validate(self):
        """Check the parameters against ``_parameter_constraints``."""
        self._validate_params()

    def _warn_if_no_layers(self, kinds):
        if not self.layers_:
            warnings.warn(
                f"{type(self).__name__} found no {kinds} layer to act on "
                f"(layers={self.layers!r}), so its penalty is 0.",
                UserWarning, stacklevel=2,
            )

    def _cached(self, module, select):
        """``select(module)``, recomputed only when the module or ``layers``
        change: walking ``named_modules()`` every batch is pure overhead."""
        layers = self.__dict__.get("layers")
        key = layers if isinstance(layers, str) else tuple(layers or ())
        cache = self.__dict__.get("_layer_cache")
        if cache is None or cache[0] is not module or cache[1] != key:
            cache = (module, key, select(module))
            self._layer_cache = cache
        return cache[2]

    def __getstate__(self):
        state = super().__getstate__()
        # The cache holds the module itself; the net pickles it once, device-safely.
        state.pop("_layer_cache", None)
        state.pop("_next_value", None)
        return _to_cpu(state)


class SoftOrthogonality(Regularizer):
    """Soft orthogonality of dense layers.

    Parameters
    ----------
    strength : float, default=1e-3
        Weight of the penalty in the loss.
    kind : {"frobenius", "spectral"}, default="frobenius"
        ``"frobenius"`` penalizes ``||W^T W - I||_F^2`` (Bansal, Chen and Wang,
        NeurIPS 2018); ``"spectral"`` penalizes ``sigma_max(W^T W - I)^2``,
        estimated by power iteration (SRIP).
    layers : {"hidden", "all"} or list of str, default="hidden"
        Which ``nn.Linear`` layers: all but the output layer, all, or by name
        (as in ``module.named_modules()``).
    n_power_iterations : int, default=1
        Power iterations per step for ``kind="spectral"``; the singular vector
        estimate is carried over between steps.

    Notes
    -----
    The Gram matrix is taken on the smaller side of ``W`` (``W W^T`` when it has
    fewer rows than columns), the only side that can equal the identity.

    Examples
    --------
    >>> from skreg.nets import RegularizedNetClassifier, SoftOrthogonality
    >>> net = RegularizedNetClassifier(regularizers=[SoftOrthogonality(strength=0.1)])
    >>> net.get_params()["regularizers__soft_orthogonality__strength"]
    0.1
    """

    default_name = "soft_orthogonality"

    _parameter_constraints = {
        "strength": [Interval(Real, 0, None, closed="left")],
        "kind": [StrOptions({"frobenius", "spectral"})],
        "layers": _LAYERS_CONSTRAINT,
        "n_power_iterations": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, strength=1e-3, *, kind="frobenius", layers="hidden",
                 n_power_iterations=1):
        self.strength = strength
        self.kind = kind
        self.layers = layers
        self.n_power_iterations = n_power_iterations

    def prepare(self, module, *, n_samples, n_outputs, device, generator):
        self.layers_ = [name for name, _ in
                        _select_layers(module, (nn.Linear,), self.layers)]
        self._warn_if_no_layers("nn.Linear")
        if self.kind != "spectral":
            return
        vectors = getattr(self, "vectors_", {})
        for name, layer in _select_layers(module, (nn.Linear,), self.layers):
            size = min(layer.weight.shape)
            if name not in vectors or vectors[name].shape[0] != size:
                start = torch.randn(size, generator=generator, device=device,
                                    dtype=layer.weight.dtype)
                vectors[name] = start / start.norm()
            vectors[name] = vectors[name].to(device)
        self.vectors_ = vectors

    def penalty(self, module, *, y_pred, sample_index):
        layers = self._cached(
            module, lambda m: _select_layers(m, (nn.Linear,), self.layers))
        if self.kind == "spectral":
            terms = [spectral_orthogonality_penalty(layer.weight, self.vectors_[name],
                                                    self.n_power_iterations)
                     for name, layer in layers]
        else:
            terms = [soft_orthogonality_penalty(layer.weight) for _, layer in layers]
        return self.strength * torch.stack(terms).sum() if terms else None


class ConvOrthogonality(Regularizer):
    """Kernel orthogonality of 2-D convolutions (OCNN).

    Parameters
    ----------
    strength : float, default=0.1
        Weight of the penalty in the loss.
    layers : {"hidden", "all"} or list of str, default="all"
        Which ``nn.Conv2d`` layers (``"hidden"`` and ``"all"`` both mean all of
        them), or their names.

    Notes
    -----
    For a kernel ``K`` of shape ``(M, C, k, k)`` (odd ``k``) and stride ``S``,

    ``L_orth(K) = ||conv(K, K, padding=P, stride=S) - I_r0||_F^2
    - max(0, M - C S^2)``,  ``P = floor((k - 1) / S) S``,

    where ``I_r0`` is the identity on channels at the centre of the
    ``(2P/S + 1)``-wide output and zero elsewhere (Wang, Chen, Chakraborty and Yu,
    CVPR 2020, in the form of Achour, Malgouyres and Mamalet, JMLR 2022). With
    circular padding and images of side ``N >= 2k - 1`` the squared Frobenius
    distance of the layer's Gram matrix to the identity is ``(N / S)^2 L_orth``.
    The padding follows the paper: the official OCNN code fixes ``padding=1``,
    which charges an exactly orthogonal stride-2 kernel a penalty of 2.
    :func:`conv_singular_values` shows how close to an isometry a layer is.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skreg.nets import ConvOrthogonality
    >>> conv = nn.Conv2d(2, 2, 3, padding=1)
    >>> with torch.no_grad():
    ...     _ = conv.weight.zero_()
    ...     conv.weight[0, 0, 1, 1] = conv.weight[1, 1, 1, 1] = 1.0
    >>> value = ConvOrthogonality(strength=1.0).penalty(conv, y_pred=None,
    ...                                                 sample_index=None)
    >>> value.item()
    0.0
    """

    default_name = "conv_orthogonality"

    _parameter_constraints = {
        "strength": [Interval(Real, 0, None, closed="left")],
        "layers": _LAYERS_CONSTRAINT,
    }

    def __init__(self, strength=0.1, *, layers="all"):
        self.strength = strength
        self.layers = layers

    def _convolutions(self, module):
        layers = "all" if self.layers == "hidden" else self.layers
        convs = _select_layers(module, (nn.Conv2d,), layers)
        for name, conv in convs:
            k_h, k_w = conv.kernel_size
            if k_h != k_w or k_h % 2 == 0 or conv.stride[0] != conv.stride[1]:
                raise ValueError(
                    f"ConvOrthogonality needs square odd kernels and equal strides; "
                    f"layer {name!r} has kernel_size={conv.kernel_size}, "
                    f"stride={conv.stride}."
                )
            if conv.groups != 1 or conv.dilation != (1, 1):
                raise ValueError(
                    f"ConvOrthogonality supports groups=1 and dilation=1 only; layer "
                    f"{name!r} has groups={conv.groups}, dilation={conv.dilation}."
                )
        return convs

    def prepare(self, module, *, n_samples, n_outputs, device, generator):
        self.layers_ = [name for name, _ in self._convolutions(module)]
        self._warn_if_no_layers("nn.Conv2d")

    def penalty(self, module, *, y_pred, sample_index):
        terms = [conv_orthogonality_penalty(conv.weight, conv.stride[0])
                 for _, conv in self._cached(module, self._convolutions)]
        return self.strength * torch.stack(terms).sum() if terms else None


class EarlyLearningRegularization(Regularizer):
    """Early-learning regularization (ELR) against noisy labels.

    Parameters
    ----------
    strength : float, default=3.0
        ``lambda``, the weight of the term.
    beta : float in [0, 1), default=0.7
        Momentum of each sample's running target.

    Notes
    -----
    Loss = cross-entropy ``+ lambda * mean_i log(1 - <t_i, p_i>)`` where ``p_i``
    is the softmax of the logits clamped to ``[1e-4, 1 - 1e-4]`` and the target
    ``t_i <- beta t_i + (1 - beta) p_i / sum(p_i)`` (``p`` detached) is a running
    average of the model's own early predictions; minimizing the term pulls the
    model towards them and away from memorizing wrong labels (Liu, Niles-Weed,
    Razavian and Fernandez-Granda, NeurIPS 2020). The defaults are the paper's
    for CIFAR-10 with symmetric noise. The module must output logits (the
    classifier's default criterion, ``CrossEntropyLoss``, expects them), so
    :class:`RegularizedNetRegressor` rejects this regularizer.
    Each sample's position is carried alongside ``X`` during training; the
    module never sees it. The targets are indexed by that position: a warm-start
    ``fit`` or a ``partial_fit`` on as many samples as before continues the
    running averages, row ``i`` from row ``i``, which is right for more epochs
    on the same rows in the same order and wrong for a different chunk of data
    of the same size; a different number of samples starts them from zero.

    Examples
    --------
    >>> from skreg.nets import EarlyLearningRegularization
    >>> EarlyLearningRegularization(beta=0.9)
    EarlyLearningRegularization(beta=0.9)
    """

    default_name = "elr"
    needs_sample_index = True
    needs_class_scores = True

    _parameter_constraints = {
        "strength": [Interval(Real, 0, None, closed="left")],
        "beta": [Interval(Real, 0, 1, closed="left")],
    }

    def __init__(self, strength=3.0, *, beta=0.7):
        self.strength = strength
        self.beta = beta

    def prepare(self, module, *, n_samples, n_outputs, device, generator):
        targets = getattr(self, "targets_", None)
        if targets is None or tuple(targets.shape) != (n_samples, n_outputs):
            targets = torch.zeros(n_samples, n_outputs)
        self.targets_ = targets.to(device)

    def penalty(self, module, *, y_pred, sample_index):
        if sample_index is None:
            raise ValueError(
                "EarlyLearningRegularization needs each sample's index; train it "
                "through RegularizedNetClassifier.fit or partial_fit."
            )
        self.targets_ = self.targets_.to(dtype=y_pred.dtype)
        index = sample_index.to(self.targets_.device)
        return self.strength * elr_penalty(y_pred, self.targets_, index, self.beta)


class GroupSparsity(Regularizer):
    """Group lasso on output units (dense layers) and output channels (convs).

    Parameters
    ----------
    strength : float, default=1e-3
        ``lambda`` in ``lambda * sum_g ||w_g||_2``.
    layers : {"hidden", "all"} or list of str, default="hidden"
        Which ``nn.Linear`` / ``nn.Conv2d`` layers: all but the output layer,
        all, or by name.

    Notes
    -----
    A group ``w_g`` is one unit's incoming weights and its bias. After each
    optimizer step the proximal map of ``lr * lambda * ||w_g||`` is applied,
    ``w_g <- max(0, 1 - lr lambda / ||w_g||) w_g``, so groups become exactly
    zero rather than merely small (Yuan and Lin, 2006; Wen et al., NeurIPS 2016).
    With an adaptive optimizer (Adam) this is a heuristic proximal step, as is
    usual in practice. The penalty value is recorded in ``history`` but carries
    no gradient. :meth:`RegularizedNetClassifier.group_sparsity` reports the
    fraction of zero groups and :meth:`MLP.prune` removes them.

    Examples
    --------
    >>> from skreg.nets import GroupSparsity
    >>> GroupSparsity(strength=0.01).get_params()
    {'layers': 'hidden', 'strength': 0.01}
    """

    default_name = "group_sparsity"

    _parameter_constraints = {
        "strength": [Interval(Real, 0, None, closed="left")],
        "layers": _LAYERS_CONSTRAINT,
    }

    def __init__(self, strength=1e-3, *, layers="hidden"):
        self.strength = strength
        self.layers = layers

    def _groups(self, module):
        return self._cached(
            module, lambda m: _select_layers(m, (nn.Linear, nn.Conv2d), self.layers))

    def prepare(self, module, *, n_samples, n_outputs, device, generator):
        self.layers_ = [name for name, _ in self._groups(module)]
        self._warn_if_no_layers("nn.Linear or nn.Conv2d")
        self.__dict__.pop("_next_value", None)

    def penalty(self, module, *, y_pred, sample_index):
        # The proximal step already knows the norms the next batch will see.
        value = self.__dict__.pop("_next_value", None)
        if value is not None:
            return value
        with torch.no_grad():
            terms = [group_norms(layer.weight, layer.bias).sum()
                     for _, layer in self._groups(module)]
        return self.strength * torch.stack(terms).sum() if terms else None

    def after_step(self, module, *, lr):
        with torch.no_grad():
            terms = [group_lasso_prox_(layer.weight, layer.bias,
                                       lr * self.strength).sum()
                     for _, layer in self._groups(module)]
        if terms:
            self._next_value = self.strength * torch.stack(terms).sum()


def orthogonality_errors(module, layers="all"):
    """``||W^T W - I||_F`` (smaller side) of each ``nn.Linear`` layer.

    Parameters
    ----------
    module : torch.nn.Module
        E.g. a fitted net's ``module_``.
    layers : {"hidden", "all"} or list of str, default="all"

    Returns
    -------
    dict
        Layer name to the (unsquared) Frobenius orthogonality error, a float.

    Examples
    --------
    >>> import torch
    >>> from skreg.nets import MLP, orthogonality_errors
    >>> module = MLP(3, 3, hidden_units=())
    >>> with torch.no_grad():
    ...     _ = module.output.weight.copy_(torch.eye(3))
    >>> orthogonality_errors(module)
    {'output': 0.0}
    """
    with torch.no_grad():
        return {name: float(gram_residual(layer.weight).norm())
                for name, layer in _select_layers(module, (nn.Linear,), layers)}


def conv_singular_values(module, image_size, layers="all"):
    """Singular values of each conv layer as a circular convolution.

    The network's convolutions are visited in order; each sees an image of the
    side the previous strides leave (``image_size`` for the first).

    Parameters
    ----------
    module : torch.nn.Module
        E.g. a fitted net's ``module_`` (a :class:`SmallCNN`).
    image_size : int
        Side of the input image; every stride must divide the side it meets.
    layers : {"hidden", "all"} or list of str, default="all"

    Returns
    -------
    dict
        Layer name to a sorted NumPy array of its singular values; an isometry
        has all of them equal to 1.

    Examples
    --------
    >>> from skreg.nets import SmallCNN, conv_singular_values
    >>> spectra = conv_singular_values(SmallCNN(64, 10), image_size=8)
    >>> sorted(spectra)
    ['features.0', 'features.2']
    """
    wanted = {name for name, _ in _select_layers(
        module, (nn.Conv2d,), "all" if layers == "hidden" else layers)}
    spectra = {}
    side = int(image_size)
    with torch.no_grad():
        for name, conv in module.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            stride = conv.stride[0]
            if name in wanted:
                values = circular_conv_singular_values(
                    conv.weight, side, stride=stride, padding=conv.padding[0])
                spectra[name] = np.sort(values.cpu().numpy())
            side //= stride
    return spectra
