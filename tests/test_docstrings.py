"""Every public class and function documents its parameters and shows a doctest."""

import importlib
import inspect

import pytest

import skreg

numpydoc_validate = pytest.importorskip("numpydoc.validate")

# numpydoc checks enforced: docstring present, every parameter documented and no
# phantom one, a summary, an Examples section.
ENFORCED = {"GL08", "PR01", "PR02", "SS01", "EX01"}


def _public_objects():
    modules = ["skreg.datasets", "skreg.utils",
               *[f"skreg.{family}" for family in skreg.FAMILIES]]
    seen = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen[f"{name}.{attr}"] = obj
    return sorted(seen.items())


OBJECTS = _public_objects()


@pytest.mark.parametrize("path, obj", OBJECTS, ids=[p for p, _ in OBJECTS])
def test_public_object_has_a_complete_numpydoc_docstring(path, obj):
    qualified = f"{obj.__module__}.{obj.__qualname__}"
    report = numpydoc_validate.validate(qualified)
    errors = [f"{code}: {msg}" for code, msg in report["errors"] if code in ENFORCED]
    assert not errors, f"{path}:\n" + "\n".join(errors)
    assert ">>>" in (obj.__doc__ or ""), f"{path} has no doctest example"
