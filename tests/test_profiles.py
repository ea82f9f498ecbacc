"""CACHE_SPACE profiles: saved and validated, stale entries skipped, and recorded from a
real run of a small program (fanotify as root, /proc sampling unprivileged)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from prealloc import profiles
from prealloc.profiles import Profile, ProfileEntry, load_profile, record, save_profile

# Creates three files in the directory it is given, reads them back, keeps them open a
# moment (so /proc sampling sees them) and exits.
PROGRAM = """
import os, sys, time
d = sys.argv[1]
handles = []
for name in ("one.dat", "two.dat", "three.dat"):
    with open(os.path.join(d, name), "wb") as f:
        f.write(name.encode() * 1000)
    handles.append(open(os.path.join(d, name), "rb"))
for h in handles:
    h.read()
time.sleep(0.5)
"""


def is_root() -> bool:
    return os.geteuid() == 0


def test_save_load_roundtrip(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"x" * 100)
    profile = Profile.from_paths("app-1", [str(target)])
    path = save_profile(profile, tmp_path / "profiles")
    assert path == tmp_path / "profiles" / "app-1.json"
    loaded = load_profile("app-1", tmp_path / "profiles")
    assert loaded.files == [ProfileEntry(str(target), 100, target.stat().st_mtime_ns)]
    assert loaded.current() == (loaded.files, 0)
    target.write_bytes(b"y" * 101)
    assert loaded.current() == ([], 1)  # changed size: stale
    os.unlink(target)
    assert loaded.current() == ([], 1)  # gone: stale


@pytest.mark.parametrize("data, message", [
    ([], "JSON object"),
    ({"format": "other", "version": 1}, "format"),
    ({"format": "prealloc-profile", "version": 2, "name": "a", "files": []}, "version"),
    ({"format": "prealloc-profile", "version": 1, "name": "../x", "files": []}, "profile name"),
    ({"format": "prealloc-profile", "version": 1, "name": "a", "files": {}}, "files must be a list"),
    ({"format": "prealloc-profile", "version": 1, "name": "a",
      "files": [{"path": "rel", "size": 1, "mtime_ns": 1}]}, r"files\[0\].path"),
    ({"format": "prealloc-profile", "version": 1, "name": "a",
      "files": [{"path": "/x", "size": -1, "mtime_ns": 1}]}, r"files\[0\].size"),
    ({"format": "prealloc-profile", "version": 1, "name": "a",
      "files": [{"path": "/x", "size": 1, "mtime_ns": True}]}, r"files\[0\].mtime_ns"),
])
def test_invalid_profiles_are_refused(tmp_path, data, message):
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_profile("a", tmp_path)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_profile("a", tmp_path)
    with pytest.raises(FileNotFoundError):
        load_profile("b", tmp_path)
    with pytest.raises(ValueError, match="profile name"):
        profiles.profile_path("a/b", tmp_path)


def test_record_proc_yields_exactly_the_files_the_program_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    profile = record([sys.executable, "-c", PROGRAM, str(data)], name="three", seconds=10,
                     directory=tmp_path / "profiles", method="proc", roots=[str(data)])
    assert profile.method == "proc"
    assert sorted(e.path for e in profile.files) == sorted(
        str(data / n) for n in ("one.dat", "two.dat", "three.dat"))
    assert all(e.size == os.path.getsize(e.path) for e in profile.files)
    assert load_profile("three", tmp_path / "profiles").files == profile.files


def test_record_auto_uses_fanotify_as_root_and_a_tracer_otherwise(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    profile = record([sys.executable, "-c", PROGRAM, str(data)], name="auto", seconds=10,
                     directory=tmp_path / "profiles", roots=[str(data)], save=False)
    if is_root():
        assert profile.method == "fanotify"
    else:
        assert profile.method == ("strace" if strace_works() else "proc")
    assert sorted(os.path.basename(e.path) for e in profile.files) == ["one.dat", "three.dat", "two.dat"]
    assert not (tmp_path / "profiles").exists()  # save=False


def strace_works() -> bool:
    import shutil
    if shutil.which("strace") is None:
        return False
    return subprocess.run(["strace", "-qq", "-o", os.devnull, "true"], capture_output=True).returncode == 0


def test_record_strace_yields_exactly_the_files(tmp_path):
    if not strace_works():
        pytest.skip("strace is not installed or may not trace here")
    data = tmp_path / "data"
    data.mkdir()
    # no keep-open pause needed: every open is traced, however short
    quick = PROGRAM.replace("time.sleep(0.5)", "")
    profile = record([sys.executable, "-c", quick, str(data)], name="traced", seconds=20,
                     method="strace", roots=[str(data)], save=False)
    assert profile.method == "strace"
    assert sorted(os.path.basename(e.path) for e in profile.files) == ["one.dat", "three.dat", "two.dat"]
    # without roots, the interpreter itself and what it imports are there too
    everything = record([sys.executable, "-c", quick, str(data)], name="traced", seconds=20,
                        method="strace", save=False)
    assert os.path.realpath(sys.executable) in {e.path for e in everything.files}


def test_record_fanotify_refused_unprivileged(tmp_path):
    if is_root():
        pytest.skip("root may use fanotify: the refusal is an unprivileged case")
    with pytest.raises(PermissionError):
        record([sys.executable, "-c", "pass"], name="x", method="fanotify", save=False)


def test_record_validates():
    with pytest.raises(ValueError, match="command"):
        record("ls", name="x")
    with pytest.raises(ValueError, match="seconds"):
        record(["true"], name="x", seconds=0)
    with pytest.raises(ValueError, match="method"):
        record(["true"], name="x", method="ptrace")
    with pytest.raises(ValueError, match="profile name"):
        record(["true"], name="")


def test_cli_record(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = subprocess.run([sys.executable, "-m", "prealloc", "record", "--name", "cli", "--dir",
                          str(tmp_path / "p"), "--root", str(data), "--seconds", "10", "--",
                          sys.executable, "-c", PROGRAM, str(data)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "recorded 3 files" in out.stdout
    assert ("fanotify" if is_root() else "strace" if strace_works() else "proc") in out.stdout
    assert len(load_profile("cli", tmp_path / "p").files) == 3
    bad = subprocess.run([sys.executable, "-m", "prealloc", "record", "--name", "cli"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "command after --" in bad.stderr
