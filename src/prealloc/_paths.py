"""Where the installed package keeps the core's public C headers and static library.

They are installed beside the compiled extension module. That is the package folder of a
regular install; in an editable install the Python sources stay in the checkout while the
build outputs (extension, headers, library) live in site-packages, so the extension
module's location is the one to follow.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def _build_outputs_dir() -> Path:
    spec = importlib.util.find_spec("prealloc._native")
    if spec is None or spec.origin is None:
        raise RuntimeError("prealloc._native is not built: install the package (pip install .)")
    return Path(spec.origin).resolve().parent


def get_include() -> str:
    """The folder to pass with -I: it holds prealloc/prealloc.h and the component headers."""
    return str(_build_outputs_dir() / "include")


def get_library_dir() -> str:
    """The folder to pass with -L: it holds libprealloc_core.a (link -lprealloc_core -lpthread)."""
    return str(_build_outputs_dir() / "lib")
