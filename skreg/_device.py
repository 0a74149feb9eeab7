"""The one place that knows torch devices and dtypes.

Every estimator takes ``device`` ("auto", "cpu", "cuda", "cuda:N" or a
:class:`torch.device`). Arrays cross into torch through :func:`to_tensor` and
come back through :func:`to_numpy`; both keep float32 as float32 and float64 as
float64, so a float32 pipeline never silently doubles its memory.
"""

import re
import warnings

import numpy as np
import torch
from sklearn.utils import check_random_state

__all__ = [
    "cuda_available",
    "device_name",
    "resolve_device",
    "seed_torch",
    "to_numpy",
    "to_tensor",
    "torch_dtype",
    "torch_generator",
]

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

_NUMPY_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


def cuda_available():
    """Return True when torch sees at least one CUDA device."""
    return torch.cuda.is_available()


def resolve_device(device="auto", *, fallback=False):
    """Turn a device specification into a :class:`torch.device`.

    Parameters
    ----------
    device : {"auto", "cpu", "cuda", "cuda:N"} or torch.device, default="auto"
        ``"auto"`` picks the first CUDA device when one is available and the
        CPU otherwise.
    fallback : bool, default=False
        Where a CUDA device is asked for but not available, warn and return
        the CPU instead of raising. For the methods of a fitted model, whose
        attributes are NumPy: a model fitted with ``device="cuda"`` and
        unpickled on a machine without CUDA still transforms and predicts
        (as skorch's nets do).

    Returns
    -------
    torch.device
        The resolved device.

    Raises
    ------
    ValueError
        For an unknown device string, or a CUDA device on a machine without
        CUDA (or with fewer devices than the index asks for).
    TypeError
        When ``device`` is neither a string nor a :class:`torch.device`.

    Examples
    --------
    >>> from skreg._device import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip().lower()
    else:
        raise TypeError(
            "device must be a string ('auto', 'cpu', 'cuda', 'cuda:N') or a "
            f"torch.device, got {type(device).__name__}."
        )
    if not _DEVICE_PATTERN.match(spec):
        raise ValueError(
            "device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (N a device index), "
            f"got {device!r}."
        )
    if spec == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not cuda_available():
        problem = f"device={device!r} was requested but CUDA is not available on "
        problem += "this machine"
    elif (torch.device(spec).index or 0) >= torch.cuda.device_count():
        problem = (f"device={device!r} was requested but only "
                   f"{torch.cuda.device_count()} CUDA device(s) are visible")
    else:
        return torch.device(spec)
    if fallback:
        warnings.warn(
            f"{problem}; computing on the CPU (set_params(device='cpu') or "
            "device='auto' silences this).", UserWarning, stacklevel=3)
        return torch.device("cpu")
    raise ValueError(f"{problem}; use device='cpu' or device='auto'.")


def device_name(device):
    """Human-readable name of a resolved device ("cpu" or the GPU's name)."""
    device = resolve_device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def torch_dtype(dtype):
    """The torch float dtype matching a NumPy dtype (float32 or float64).

    Any other dtype maps to float64, the precision scikit-learn validates to.
    """
    return _NUMPY_TO_TORCH.get(np.dtype(dtype), torch.float64)


def to_tensor(X, device="cpu", dtype=None):
    """Move an array or tensor to ``device`` as a float tensor.

    Parameters
    ----------
    X : array-like or torch.Tensor
        The data. NumPy arrays are shared with torch when possible (no copy on
        the CPU).
    device : str or torch.device, default="cpu"
        Target device, resolved with :func:`resolve_device`.
    dtype : numpy or torch dtype, default=None
        Float dtype of the result. By default float32 stays float32 and
        everything else becomes float64.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import numpy as np
    >>> from skreg._device import to_tensor
    >>> to_tensor(np.ones(3, dtype=np.float32)).dtype
    torch.float32
    """
    device = resolve_device(device)
    if isinstance(dtype, torch.dtype):
        target = dtype
    elif dtype is not None:
        target = torch_dtype(dtype)
    elif isinstance(X, torch.Tensor):
        target = X.dtype if X.dtype in (torch.float32, torch.float64) else None
        target = target or torch.float64
    else:
        X = np.asarray(X)
        target = torch_dtype(X.dtype)
    if isinstance(X, torch.Tensor):
        return X.to(device=device, dtype=target)
    X = np.asarray(X)
    if not X.flags.writeable:
        # torch cannot share read-only memory (e.g. a memmap); copy it once.
        X = X.copy()
    return torch.as_tensor(X, dtype=target, device=device)


def to_numpy(tensor):
    """Detach a tensor and return it as a NumPy array on the CPU.

    Floating dtypes are kept (float32 stays float32).
    """
    if isinstance(tensor, np.ndarray):
        return tensor
    return tensor.detach().cpu().numpy()


def seed_torch(random_state):
    """Draw a torch seed from ``random_state`` and seed torch's global generators.

    Parameters
    ----------
    random_state : int, RandomState instance or None
        Passed through :func:`sklearn.utils.check_random_state`.

    Returns
    -------
    int
        The seed given to :func:`torch.manual_seed` (which also seeds CUDA).
    """
    seed = _draw_seed(random_state)
    torch.manual_seed(seed)
    return seed


def torch_generator(random_state, device="cpu"):
    """A :class:`torch.Generator` on ``device`` seeded from ``random_state``.

    Unlike :func:`seed_torch` this leaves torch's global state alone, so two
    estimators fitted in one process do not disturb each other's streams.
    """
    device = resolve_device(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(_draw_seed(random_state))
    return generator


def _draw_seed(random_state):
    rng = check_random_state(random_state)
    return int(rng.randint(0, 2**31 - 1))
