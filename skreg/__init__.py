"""skreg: scikit-learn estimators for regularized and structured learning.

Five families, each a subpackage:

- :mod:`skreg.decomposition`: orthogonal dictionary learning (batch and online).
- :mod:`skreg.transport`: sparsity-constrained optimal transport.
- :mod:`skreg.ordinal`: PRESTO ordinal regression for rare classes.
- :mod:`skreg.completion`: low-rank matrix completion by alternating minimization.
- :mod:`skreg.nets`: skorch nets with orthogonality, ELR and group sparsity.

The heavy arithmetic runs in torch, on a GPU when one is available
(``device="auto"``).
"""

__version__ = "0.1.0"

FAMILIES = ("decomposition", "transport", "ordinal", "completion", "nets")

__all__ = ["FAMILIES", "__version__", "show_versions", *FAMILIES]


def show_versions():
    """Print the versions of skreg and its dependencies, and the compute device.

    Examples
    --------
    >>> import skreg
    >>> skreg.show_versions()  # doctest: +ELLIPSIS
    skreg: ...
    """
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from ._device import cuda_available, device_name

    def _version(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    rows = [
        ("skreg", __version__),
        ("python", platform.python_version()),
        ("numpy", _version("numpy")),
        ("scipy", _version("scipy")),
        ("scikit-learn", _version("scikit-learn")),
        ("torch", torch.__version__),
        ("skorch", _version("skorch")),
        ("POT", _version("POT")),
        ("CUDA available", str(cuda_available())),
        ("CUDA version", str(torch.version.cuda)),
        ("default device", device_name("auto")),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")


def __getattr__(name):
    # Subpackages load lazily so `import skreg` stays cheap.
    if name in FAMILIES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
