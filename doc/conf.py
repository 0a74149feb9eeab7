"""Sphinx configuration: numpydoc, sphinx-gallery over examples/, and an API page
generated from every family's ``__all__``."""

import importlib
import inspect
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import skreg

project = "skreg"
author = "skreg developers"
release = version = skreg.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

html_theme = "pydata_sphinx_theme"
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
numpydoc_show_class_members = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "download_all_examples": False,
}


def _write_api_page(app):
    """Write api.rst from the public names (``__all__``) of each family."""
    lines = ["API reference", "=============", ""]
    modules = ["skreg", "skreg.datasets", *[f"skreg.{f}" for f in skreg.FAMILIES]]
    for name in modules:
        module = importlib.import_module(name)
        public = [
            n for n in getattr(module, "__all__", [])
            if n not in skreg.FAMILIES and not n.startswith("__") and n != "FAMILIES"
        ]
        if not public:
            continue
        lines += [f":mod:`{name}`", "-" * (len(name) + 7), ""]
        for n in public:
            kind = "class" if inspect.isclass(getattr(module, n)) else "function"
            lines += [f".. auto{kind}:: {name}.{n}", ""]
    path = os.path.join(app.srcdir, "api.rst")
    text = "\n".join(lines)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as handle:
            handle.write(text)


def setup(app):
    app.connect("builder-inited", _write_api_page)
