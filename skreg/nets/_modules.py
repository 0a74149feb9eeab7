"""Default torch modules of the regularized nets: an MLP and a small CNN.

Both take ``n_features`` and ``n_outputs`` as their first arguments; the nets fill
them in at fit time from the data, so ``module__hidden_units`` and friends are the
only sizes a user tunes.
"""

import math
from numbers import Integral, Real

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def _check_tol(tol):
    """``tol`` of :meth:`MLP.prune` and ``group_sparsity``: a number >= 0."""
    if (isinstance(tol, bool) or not isinstance(tol, Real) or math.isnan(tol)
            or tol < 0):
        raise ValueError(f"tol must be a non-negative number, got {tol!r}.")


def _hidden_widths(hidden_units):
    """``hidden_units`` as a tuple of ints (a bare int is the usual slip)."""
    try:
        widths = tuple(hidden_units)
    except TypeError:
        widths = None
    if (widths is None or isinstance(hidden_units, str)
            or not all(isinstance(h, Integral) for h in widths)):
        raise TypeError(
            "hidden_units must be a tuple of ints, one width per hidden layer "
            f"(e.g. (16,) rather than 16), got {hidden_units!r}."
        )
    return widths


def _activation(name):
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}."
        )
    return _ACTIVATIONS[name]()


class MLP(nn.Module):
    """Fully connected network: ``Linear -> activation -> dropout`` blocks, then a
    linear output layer (logits for classification, values for regression).

    Parameters
    ----------
    n_features : int
        Input width; set by the net from ``X`` at fit time.
    n_outputs : int
        Output width (number of classes or of regression targets); set by the net.
    hidden_units : tuple of int, default=(100,)
        Width of each hidden layer; ``()`` gives a linear model.
    activation : {"relu", "tanh", "gelu"}, default="relu"
        Non-linearity after each hidden layer.
    dropout : float in [0, 1), default=0.0
        Dropout probability after each hidden activation.

    Examples
    --------
    >>> import torch
    >>> from skreg.nets import MLP
    >>> MLP(4, 3, hidden_units=(8,))(torch.zeros(2, 4)).shape
    torch.Size([2, 3])
    """

    def __init__(self, n_features, n_outputs, hidden_units=(100,),
                 activation="relu", dropout=0.0):
        super().__init__()
        if (isinstance(dropout, bool) or not isinstance(dropout, Real)
                or not 0 <= dropout < 1):
            raise ValueError(
                f"dropout must be a probability in [0, 1), got {dropout!r}."
            )
        widths = [int(n_features), *(int(h) for h in _hidden_widths(hidden_units))]
        if any(w < 1 for w in widths) or int(n_outputs) < 1:
            raise ValueError(
                "n_features, n_outputs and every entry of hidden_units must be "
                f"positive integers, got n_features={n_features}, "
                f"n_outputs={n_outputs}, hidden_units={hidden_units}."
            )
        self.hidden_units = tuple(widths[1:])
        self.activation = activation
        self.dropout = dropout
        blocks = []
        for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
            blocks += [nn.Linear(n_in, n_out), _activation(activation)]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
        self.hidden = nn.Sequential(*blocks)
        self.output = nn.Linear(widths[-1], int(n_outputs))

    def forward(self, X):
        return self.output(self.hidden(X))

    def prune(self, tol=0.0):
        """A smaller MLP without the hidden units whose incoming weights and bias
        are all at most ``tol`` in absolute value (the groups zeroed by
        :class:`GroupSparsity`).

        The pruned network computes the same function when ``tol=0`` and the
        activation maps 0 to 0 (relu, tanh, gelu do); at least one unit is kept
        per layer.

        Parameters
        ----------
        tol : float, default=0.0
            Entries at most ``tol`` in absolute value count as zero; a
            non-negative number.

        Returns
        -------
        MLP
            A new module on the same device; this one is left unchanged.
        """
        _check_tol(tol)
        layers = [m for m in self.hidden if isinstance(m, nn.Linear)]
        keeps = []
        for layer in layers:
            rows = torch.cat([layer.weight, layer.bias[:, None]], dim=1)
            keep = (rows.abs() > tol).any(dim=1).nonzero().flatten()
            if keep.numel() == 0:
                keep = rows.norm(dim=1).argmax().reshape(1)
            keeps.append(keep)
        pruned = MLP(
            layers[0].in_features if layers else self.output.in_features,
            self.output.out_features,
            hidden_units=tuple(int(k.numel()) for k in keeps),
            activation=self.activation,
            dropout=self.dropout,
        ).to(self.output.weight.device)
        new_layers = [m for m in pruned.hidden if isinstance(m, nn.Linear)]
        previous = None
        with torch.no_grad():
            for old, new, keep in zip(layers, new_layers, keeps, strict=True):
                weight = old.weight[keep]
                new.weight.copy_(weight if previous is None else weight[:, previous])
                new.bias.copy_(old.bias[keep])
                previous = keep
            out = self.output.weight
            pruned.output.weight.copy_(out if previous is None else out[:, previous])
            pruned.output.bias.copy_(self.output.bias)
        return pruned


class SmallCNN(nn.Module):
    """Small convolutional network for flattened images (e.g. digits, 8x8).

    Each block is ``Conv2d(kernel_size, stride, padding=kernel_size // 2) ->
    activation``; the feature map is flattened into a linear output layer.

    Parameters
    ----------
    n_features : int
        Flattened input width, ``channels * height * width``; set by the net.
    n_outputs : int
        Output width; set by the net.
    image_shape : tuple of int, default=None
        ``(channels, height, width)`` or ``(height, width)``; ``None`` means one
        channel and a square image of side ``sqrt(n_features)``.
    channels : tuple of int, default=(16, 32)
        Output channels of each convolution.
    strides : tuple of int, default=(1, 2)
        Stride of each convolution (same length as ``channels``).
    kernel_size : int, default=3
        Odd kernel size of every convolution.
    activation : {"relu", "tanh", "gelu"}, default="relu"

    Examples
    --------
    >>> import torch
    >>> from skreg.nets import SmallCNN
    >>> SmallCNN(64, 10)(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_features, n_outputs, image_shape=None, channels=(16, 32),
                 strides=(1, 2), kernel_size=3, activation="relu"):
        super().__init__()
        self.image_shape = _image_shape(int(n_features), image_shape)
        if len(channels) != len(strides):
            raise ValueError(
                "channels and strides must have the same length, got "
                f"{len(channels)} and {len(strides)}."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be odd and positive, got {kernel_size}."
            )
        n_in, height, width = self.image_shape
        blocks = []
        for n_out, stride in zip(channels, strides, strict=True):
            blocks += [
                nn.Conv2d(n_in, int(n_out), kernel_size, stride=int(stride),
                          padding=kernel_size // 2),
                _activation(activation),
            ]
            n_in = int(n_out)
            height = (height - 1) // stride + 1
            width = (width - 1) // stride + 1
        self.features = nn.Sequential(*blocks)
        self.output = nn.Linear(n_in * height * width, int(n_outputs))

    def forward(self, X):
        images = X.reshape(X.shape[0], *self.image_shape)
        return self.output(self.features(images).flatten(1))


def _image_shape(n_features, image_shape):
    if image_shape is None:
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ValueError(
                f"SmallCNN needs image_shape when n_features={n_features} is not a "
                "perfect square."
            )
        return (1, side, side)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or math.prod(shape) != n_features:
        raise ValueError(
            f"image_shape={image_shape} does not match n_features={n_features}; "
            "give (channels, height, width) or (height, width)."
        )
    return shape
