"""`import prealloc` stays cheap: importlib.metadata (the larger part of the plugin
lookup's cost) is imported only when an allocator looks for plugins, and the extension
module exports nothing but its init function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_does_not_load_importlib_metadata():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, prealloc; print('importlib.metadata' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_plugin_discovery_still_finds_entry_points():
    from prealloc import plugins

    # no installed package publishes the group in the test environment: an empty answer,
    # reached through importlib.metadata
    assert plugins.discover("prealloc.no-such-group") == {}
    assert "importlib.metadata" in sys.modules


def _defined_dynamic_symbols(path: Path) -> list[str]:
    done = subprocess.run(["nm", "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in done.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_extension_exports_only_its_init():
    from prealloc import _native

    names = _defined_dynamic_symbols(Path(_native.__file__))
    assert names, "nm found no dynamic symbols at all"
    leaked = [n for n in names if not n.startswith("PyInit_")]
    assert leaked == [], f"_native exports {len(leaked)} more symbols: {leaked[:10]}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_static_core_defines_only_prefixed_symbols():
    import prealloc

    library = Path(prealloc.get_library_dir()) / "libprealloc_core.a"
    if not library.is_file():
        pytest.skip(f"no static core installed at {library} (an editable build)")
    done = subprocess.run(["nm", "-g", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in done.stdout.splitlines() if len(line.split()) == 3]
    assert names
    assert [n for n in names if not n.startswith("pa_")] == []
