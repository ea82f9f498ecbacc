"""The package ships the license its metadata declares: LICENSE (Apache-2.0) in the
installed distribution's .dist-info and in the sdist."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_distribution_carries_the_license():
    dist = distribution("prealloc")
    text = dist.read_text("licenses/LICENSE") or dist.read_text("LICENSE")
    assert text is not None, "no LICENSE in the installed .dist-info"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Apache-2.0" in (dist.metadata.get("License-Expression") or dist.metadata.get("License") or "")


def test_sdist_carries_the_license(tmp_path):
    if not all((ROOT / name).exists() for name in ("pyproject.toml", "CMakeLists.txt", "README.md", "src")):
        pytest.skip("not run from a source checkout (these tests were copied without the sources)")
    pytest.importorskip("scikit_build_core.build")
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys, scikit_build_core.build as b; print(b.build_sdist(sys.argv[1]))", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    sdist = tmp_path / done.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        member = next(n for n in names if n.endswith("/LICENSE") and n.count("/") == 1)
        text = archive.extractfile(member).read().decode()
    assert "Apache License" in text
