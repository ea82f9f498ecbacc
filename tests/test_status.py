"""`prealloc status`: real journal entries (a CPU pin of a child made by a host process,
then SIGKILLed), the machine-wide core registry, the broker; read without changing
anything; --json's schema; --watch's refreshes (ANSI clear only on a terminal, Ctrl-C
exits 0)."""
from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from osutil import FOREGROUND_PREALLOC, PINNING_HOST, cpus_allowed, signal_and_wait, thread_ids
from prealloc import cli, core, journal, status

ALL = core.get_affinity(0)
needs_two_cores = pytest.mark.skipif(len(ALL) < 2, reason="pinning to a subset needs 2 or more usable cores")

HOST = PINNING_HOST

ROW_KEYS = {"allocation_id", "owner_pid", "owner_start", "owner_uid", "owner_alive", "command", "resource_type",
            "requested", "effective", "status", "age_s", "expires_in_s", "cores", "origin"}
ENTRY_KEYS = {"file", "kind", "owner_pid", "owner_start", "owner_alive", "command", "uid", "state", "age_s",
              "what", "target_pid"}
HOLDER_KEYS = {"core", "pid", "start", "uid", "level", "allocation_id", "since", "alive", "command", "confirmed"}


@pytest.fixture
def journal_dir(tmp_path):
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def no_broker(tmp_path):
    """A socket path where no broker listens, so a broker running on the machine is not asked."""
    return str(tmp_path / "no-broker.sock")


def status_json(journal_dir, socket_path, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "prealloc", "status", "--json", "--dir", str(journal_dir),
                           "--socket", socket_path, *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def start_host(journal_dir, target: int) -> tuple[subprocess.Popen, set[int]]:
    host = subprocess.Popen([sys.executable, "-c", HOST, str(journal_dir), str(target)],
                            stdout=subprocess.PIPE, text=True)
    line = host.stdout.readline()
    assert line, "the host died before pinning"
    return host, {int(c) for c in line.split()}


@needs_two_cores
def test_a_killed_hosts_pin_is_listed_with_a_dead_owner_and_left_alone(child, journal_dir, no_broker):
    host, cores = start_host(journal_dir, child.pid)
    try:
        live = status_json(journal_dir, no_broker)
        assert live["source"] == "local"
        assert no_broker in live["broker"]["reason"] and live["broker"]["answered"] is False
        [entry] = live["journal"]["entries"]
        assert entry["kind"] == "affinity" and entry["owner_pid"] == host.pid
        assert entry["owner_start"] == journal.process_start_time(host.pid)
        assert entry["owner_alive"] is True and entry["state"] == "live"
        assert entry["command"] == Path(f"/proc/{host.pid}/comm").read_text().strip()
        assert entry["target_pid"] == child.pid and str(child.pid) in entry["what"]
        assert entry["uid"] == os.geteuid()
        # the exclusive cores it holds machine-wide (the registry level, the default)
        held = [h for h in live["cores"]["holders"] if h["pid"] == host.pid]
        assert {h["core"] for h in held} == cores and all(h["alive"] and h["confirmed"] for h in held)
        [row] = [r for r in live["reservations"] if r["owner_pid"] == host.pid]
        assert row["cores"] == sorted(cores) and row["effective"] == 100.0 * len(cores)
        assert row["command"] == entry["command"] and row["status"].startswith("held")
    finally:
        host.send_signal(signal.SIGKILL)
        host.wait()
    try:
        before = snapshot(journal_dir)
        dead = status_json(journal_dir, no_broker)
        [entry] = dead["journal"]["entries"]
        assert entry["owner_pid"] == host.pid and entry["owner_alive"] is False
        assert entry["state"] == "owner dead" and entry["command"] is None
        # the kernel dropped the dead holder's core locks: no longer held, no longer listed
        assert [h for h in dead["cores"]["holders"] if h["pid"] == host.pid] == []
        # reading recovered nothing: the entry is still there, unchanged, and the child still pinned
        assert snapshot(journal_dir) == before
        assert all(cpus_allowed(child.pid, tid) == cores for tid in thread_ids(child.pid))
        table = subprocess.run([sys.executable, "-m", "prealloc", "status", "--dir", str(journal_dir),
                                "--socket", no_broker], capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        line = next(row for row in table.stdout.splitlines() if entry["file"] in row)
        assert f"{host.pid} (dead)" in line and "owner dead" in line
        assert "source: this machine's journal" in table.stdout
    finally:
        journal.recover(journal_dir)
    assert status_json(journal_dir, no_broker)["journal"]["entries"] == []


def test_a_reused_pid_is_not_taken_for_the_owner(journal_dir, no_broker):
    """An entry naming our pid with another start time: a process has the pid, but it is
    not the owner."""
    me = {"pid": os.getpid(), "start": journal.process_start_time(os.getpid())}
    for name, start in (("e-alive.json", me["start"]), ("e-reused.json", me["start"] + 1)):
        (journal_dir / name).write_text(json.dumps({"kind": "reserve_file", "uid": os.geteuid(),
                                                    "owner": {"pid": me["pid"], "start": start},
                                                    "path": str(journal_dir / "nothing")}))
    data = status.collect(journal_dir=journal_dir, socket_path=no_broker)
    by_file = {e["file"]: e for e in data["journal"]["entries"]}
    assert by_file["e-alive.json"]["owner_alive"] is True and by_file["e-alive.json"]["state"] == "live"
    assert by_file["e-reused.json"]["owner_alive"] is False and by_file["e-reused.json"]["state"] == "owner dead"
    assert by_file["e-reused.json"]["command"] is None  # not the command of whoever has the pid now


def test_unreadable_and_claimed_entries_are_reported_not_touched(journal_dir, no_broker):
    (journal_dir / "e-junk.json").write_text("{not json")
    dead = {"kind": "reserve_file", "uid": os.geteuid(), "owner": {"pid": 1 << 30, "start": 1}, "path": "/x"}
    (journal_dir / "e-1.recovering-4242").write_text(json.dumps(dead))
    (journal_dir / "e-2.bad").write_text("old")
    before = snapshot(journal_dir)
    data = status.collect(journal_dir=journal_dir, socket_path=no_broker)
    states = {e["file"]: e["state"] for e in data["journal"]["entries"]}
    assert states == {"e-junk.json": "unreadable", "e-1.recovering-4242": "being recovered by 4242"}
    assert data["journal"]["set_aside"] == ["e-2.bad"]
    assert snapshot(journal_dir) == before  # journal.recover would have set the junk aside as .bad


def test_an_untrusted_directory_is_refused_with_the_reason(journal_dir, no_broker):
    os.chmod(journal_dir, 0o777)
    (journal_dir / "e-planted.json").write_text(json.dumps({"owner": {"pid": 1, "start": 1}, "uid": os.geteuid()}))
    data = status.collect(journal_dir=journal_dir, socket_path=no_broker)
    assert data["journal"]["available"] is False and "writable by others" in data["journal"]["reason"]
    assert data["journal"]["entries"] == []


def test_json_schema_is_stable(journal_dir, no_broker):
    Path(journal_dir / "e-x.json").write_text(json.dumps({"kind": "reserve_file", "uid": os.geteuid(),
                                                          "owner": {"pid": 1 << 30, "start": 5}, "path": "/p"}))
    data = status_json(journal_dir, no_broker)
    assert set(data) == {"schema", "generated_at", "source", "source_detail", "broker", "reservations",
                         "journal", "cores", "quotas"}
    assert data["schema"] == status.SCHEMA_VERSION == 1
    assert set(data["broker"]) == {"socket", "answered", "reason"}
    assert set(data["journal"]) == {"directory", "available", "reason", "entries", "set_aside"}
    assert data["journal"]["directory"] == str(journal_dir)
    assert [set(e) for e in data["journal"]["entries"]] == [ENTRY_KEYS]
    assert set(data["cores"]) == {"available", "reason", "directory", "scope", "holders"}
    assert set(data["quotas"]) == {"source", "by_uid", "limits"}
    for row in data["reservations"]:
        assert set(row) == ROW_KEYS


def test_watch_refreshes_count_times_without_ansi_on_a_pipe(journal_dir, no_broker):
    done = subprocess.run([sys.executable, "-m", "prealloc", "status", "--dir", str(journal_dir), "--socket",
                           no_broker, "--json", "--watch", "0.1", "--count", "3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(documents) == 3 and len({d["generated_at"] for d in documents}) == 3
    table = subprocess.run([sys.executable, "-m", "prealloc", "status", "--dir", str(journal_dir), "--socket",
                            no_broker, "--watch", "0.1", "--count", "2"], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.count("source: ") == 2
    assert "\x1b" not in table.stdout


def test_watch_clears_the_screen_on_a_terminal(journal_dir, no_broker):
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "prealloc", "status", "--dir", str(journal_dir), "--socket",
                                 no_broker, "--watch", "0.1", "--count", "2"], stdout=terminal,
                                stderr=subprocess.PIPE)
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert output.count(status._CLEAR.encode()) == 2 and output.count(b"source: ") == 2


def test_ctrl_c_ends_watch_with_status_0(journal_dir, no_broker):
    proc = subprocess.Popen([*FOREGROUND_PREALLOC, "status", "--dir", str(journal_dir), "--socket", no_broker,
                             "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("source: ")
    _, err = signal_and_wait(proc, signal.SIGINT)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_bad_arguments_are_refused(capsys):
    for argv in (["status", "--watch", "0"], ["status", "--watch", "nan"], ["status", "--count", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_status_in_process_matches_the_command(journal_dir, no_broker, capsys):
    (journal_dir / "e-y.json").write_text(json.dumps({"kind": "reserve_file", "uid": os.geteuid(),
                                                      "owner": {"pid": 1 << 30, "start": 5}, "path": "/q"}))
    assert cli.main(["status", "--json", "--dir", str(journal_dir), "--socket", no_broker]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["what"] for e in data["journal"]["entries"]] == ["reserve file /q"]


# ---- the machine-wide core registry (prealloc.machine_registry) ----

HOLDER = textwrap.dedent("""
    import sys, time
    from prealloc.machine_registry import MachineCoreRegistry
    registry = MachineCoreRegistry(directory=sys.argv[1])
    lock = registry.try_acquire(int(sys.argv[2]), level="registry", allocation_id=77)
    print("held" if lock is not None else "busy", flush=True)
    time.sleep(60)
""")


def test_core_registry_holders_are_listed_while_held(journal_dir, no_broker):
    machine_registry = pytest.importorskip("prealloc.machine_registry",
                                           reason="the machine-wide core registry is not in this version")
    registry_dir = machine_registry.shared_directory() or machine_registry.registry_directory_for(journal_dir)
    core_id = max(ALL)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(registry_dir), str(core_id)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        data = status.collect(journal_dir=journal_dir, socket_path=no_broker)
        mine = [h for h in data["cores"]["holders"] if h["pid"] == holder.pid]
        assert len(mine) == 1 and set(mine[0]) == HOLDER_KEYS
        assert mine[0]["core"] == core_id and mine[0]["alive"] is True and mine[0]["allocation_id"] == 77
        assert mine[0]["start"] == journal.process_start_time(holder.pid) and mine[0]["uid"] == os.geteuid()
        [row] = [r for r in data["reservations"] if r["owner_pid"] == holder.pid]
        assert row["resource_type"] == "cpu" and row["cores"] == [core_id] and row["effective"] == 100.0
        assert row["origin"] == "core_registry"
        assert data["quotas"]["by_uid"][str(os.geteuid())]["cpu"] >= 100.0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the dead holder's lock: it is no longer listed
    after = status.collect(journal_dir=journal_dir, socket_path=no_broker)
    assert [h for h in after["cores"]["holders"] if h["pid"] == holder.pid] == []


# ---- the broker (prealloc serve) ----


def _commands() -> set[str]:
    import argparse

    parser = cli.build_parser()
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def _wait_for_socket(path: Path, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        if proc.poll() is not None:
            raise AssertionError(f"prealloc serve exited with {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("prealloc serve never listened")


def test_status_comes_from_the_broker_when_one_answers(tmp_path, journal_dir):
    pytest.importorskip("prealloc.server", reason="prealloc serve is not in this version")
    if "serve" not in _commands():
        pytest.skip("prealloc serve is not a command of this version's CLI yet")
    client_module = pytest.importorskip("prealloc.client", reason="prealloc.client is not in this version")
    path = tmp_path / "broker.sock"
    env = dict(os.environ, PREALLOC_JOURNAL_DIR=str(tmp_path / "broker-journal"))
    broker = subprocess.Popen([sys.executable, "-m", "prealloc", "serve", "--socket", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for_socket(path, broker)
        client = client_module.Client(socket_path=str(path))
        try:
            claim = client.acquire("MEMORY", 4)
            data = status_json(journal_dir, str(path))
            assert data["source"] == "broker" and data["broker"]["answered"] is True
            assert data["quotas"]["source"] == "broker"
            assert data["quotas"]["by_uid"][str(os.geteuid())]["memory"] >= 4
            mine = [r for r in data["reservations"] if r["owner_pid"] == os.getpid()]
            # the status command is a connection of its own: the broker lists it every
            # reservation of its uid (root: of every uid)
            assert len(mine) == 1 and set(mine[0]) == ROW_KEYS
            assert mine[0]["resource_type"] == "memory" and mine[0]["origin"] == "broker"
            assert mine[0]["effective"] is not None and mine[0]["effective"] >= 4
            assert mine[0]["owner_alive"] is True and mine[0]["owner_uid"] == os.geteuid()
            if os.geteuid() != 0:
                assert "this uid's reservations" in data["source_detail"]
            release = getattr(claim, "release", None) or getattr(claim, "close")
            release()
            after = status_json(journal_dir, str(path))
            assert [r for r in after["reservations"] if r["owner_pid"] == os.getpid()
                    and r["status"] not in ("released", "expired")] == []
        finally:
            client.close()
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()


def test_every_kind_is_described_by_what_it_changed(journal_dir, no_broker):
    dead = {"pid": 1 << 30, "start": 3}
    kinds = {
        "e-a.json": {"kind": "affinity", "target": {"pid": 1 << 30, "start": 1}, "applied": [[0, 1]],
                     "previous": {"7": [0, 1, 2]}, "default": [0, 1, 2]},
        "e-b.json": {"kind": "ioprio", "target": {"pid": 1 << 30, "start": 1}, "applied": [16385], "previous": {},
                     "default": 0},
        "e-c.json": {"kind": "reserve_file", "path": "/data/reserve-1"},
        "e-d.json": {"kind": "cgroup_weight", "path": "/sys/fs/cgroup/x/io.weight", "previous": 100, "applied": 500},
        "e-e.json": {"kind": "tc_htb", "ifname": "veth0", "netns": "ns1", "classes": [{"classid": 1}]},
        "e-f.json": {"kind": "cpuset", "root": "/sys/fs/cgroup/cpuset", "reserved": [1], "rest": ["r"],
                     "shrunk": [], "moved": {"11": {}, "12": {}}},
        "e-g.json": {"kind": "sched", "target": {"pid": 1 << 30, "start": 1}, "applied": [[1, 10, 0]],
                     "previous": {"9": [0, 0, 0]}, "default": [0, 0, 0]},
    }
    for name, data in kinds.items():
        (journal_dir / name).write_text(json.dumps({**data, "owner": dead, "uid": os.geteuid()}))
    what = {e["file"]: e["what"] for e in status.collect(journal_dir=journal_dir, socket_path=no_broker)
            ["journal"]["entries"]}
    assert "cpus 0-1" in what["e-a.json"] and "(target gone)" in what["e-a.json"]
    assert "I/O priority 16385" in what["e-b.json"]
    assert what["e-c.json"] == "reserve file /data/reserve-1"
    assert "500 (was 100)" in what["e-d.json"] and "io.weight" in what["e-d.json"]
    assert what["e-e.json"] == "1 HTB class(es) on veth0 in netns ns1"
    assert what["e-f.json"].startswith("2 task(s) moved off cpus 1 under /sys/fs/cgroup/cpuset")
    assert "[1, 10, 0]" in what["e-g.json"]


def test_a_silent_broker_is_reported_and_the_local_records_read(tmp_path, journal_dir, monkeypatch):
    pytest.importorskip("prealloc.client", reason="prealloc.client is not in this version")
    path = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)  # connects are queued, never answered
    monkeypatch.setattr(status, "BROKER_TIMEOUT_S", 0.5)
    try:
        data = status.collect(journal_dir=journal_dir, socket_path=str(path))
    finally:
        listener.close()
    assert data["source"] == "local" and data["broker"]["answered"] is False
    assert str(path) in data["broker"]["reason"] and "timed out" in data["broker"]["reason"].lower()
    assert data["journal"]["directory"] == str(journal_dir)
