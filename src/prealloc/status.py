"""`prealloc status`: what this machine has reserved, and for whom.

Two sources, the first that answers:

1. the machine broker (``prealloc serve``) on its socket: its ``status`` operation
   (docs/protocol.md) lists every live reservation it holds — for root every peer's,
   otherwise the caller's own — the per-uid quota use it enforces, and its journal;
2. else this machine's own records, read without a broker: the side-effect journal
   (:mod:`prealloc.journal`; this user's directory, or ``--dir``) and the machine-wide
   core registry (:mod:`prealloc.machine_registry`: a lock file per exclusive core, in the
   directory that goes with the journal's). Memory and the other types held inside a library-mode process
   leave no machine-wide record, so without a broker the reservations listed are the
   cores that registry knows of.

The answer says which source was used and why the broker was not (no socket, nobody
answering, no client in this version). Reading changes nothing: entries are read with
the journal's own reader (O_NOFOLLOW, only files of our uid, in a directory that passes
its trust check) and never recovered, renamed or set aside here; ``prealloc recover``
does that.

An owner is alive only if a process with its pid *and* its start time (clock ticks since
boot, /proc/PID/stat field 22) exists — a pid reused by a later process is not the owner.
Broker rows carry no start time: the broker holds a pidfd of each peer and releases a
peer's holdings when its connection closes, so its rows name connected processes; the
pid is still checked against /proc.

The JSON form (``--json``) is :func:`collect`'s dict, schema version ``SCHEMA_VERSION``;
its keys are always present (null where a value is unknown):

- ``schema``, ``generated_at`` (Unix time), ``source`` (``"broker"`` or ``"local"``),
  ``source_detail`` (one sentence), ``broker`` (``{"socket", "answered", "reason"}``);
- ``reservations``: rows with ``allocation_id``, ``owner_pid``, ``owner_start``,
  ``owner_uid``, ``owner_alive``, ``command``, ``resource_type``, ``requested``,
  ``effective``, ``status``, ``age_s``, ``expires_in_s``, ``cores``, ``origin``
  (``"broker"`` or ``"core_registry"``);
- ``journal``: ``{"directory", "available", "reason", "entries": [...], "set_aside": [names]}``
  with entries ``{"file", "kind", "owner_pid", "owner_start", "owner_alive", "command",
  "uid", "state", "age_s", "what", "target_pid"}``; ``state`` is ``"live"``,
  ``"owner dead"`` (``prealloc recover`` would undo it) or ``"being recovered"``;
- ``cores``: ``{"available", "reason", "directory", "scope", "holders": [{"core", "pid",
  "start", "uid", "level", "allocation_id", "since", "alive", "command", "confirmed"}]}``
  (a core is listed only while its lock is held: the kernel frees a dead holder's;
  ``confirmed`` False when the lock file's label does not name the lock's holder);
- ``quotas``: ``{"source", "by_uid": {uid: {resource_type: used}}, "limits"}`` — limits
  only from a broker (quotas are its to enforce), use from the broker or, locally, the
  registry's cores (100 per core, the CPU type's unit).
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from . import journal

SCHEMA_VERSION = 1
BROKER_TIMEOUT_S = 10.0  # a broker that does not answer by then is reported, and the local records read
NOT_AVAILABLE = "not available in this version"
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen


# ---------------------------------------------------------------------------------------
# processes


def owner_alive(pid: Any, start: Any) -> bool | None:
    """True when process pid with that start time exists; False when it does not; None
    when pid is not a pid. start None: only whether some process has the pid."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    now = journal.process_start_time(pid)
    if now is None:
        return False
    return True if start is None else now == start


def command_of(pid: Any) -> str | None:
    """The process's /proc/PID/comm, or None when it is gone."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        return Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    except OSError:
        return None


class _Owners:
    """(alive, command) of each (pid, start) asked about, looked up once per refresh:
    a host with a thousand entries is one /proc read, not a thousand."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, Any], tuple[bool | None, str | None]] = {}

    def __call__(self, pid: Any, start: Any) -> tuple[bool | None, str | None]:
        key = (pid, start)
        found = self._known.get(key)
        if found is None:
            alive = owner_alive(pid, start)
            # the command of a reused pid would name another program: only a live owner's
            found = self._known[key] = (alive, command_of(pid) if alive else None)
        return found


def _owner_facts(pid: Any, start: Any) -> tuple[bool | None, str | None]:
    return _Owners()(pid, start)


# ---------------------------------------------------------------------------------------
# the broker


def default_socket_path() -> str:
    """Where a client without a path looks for the broker (docs/protocol.md): the first
    of $PREALLOC_SOCKET, the root broker's socket, this user's that exists; the last one
    tried when none does."""
    try:
        from .protocol import client_socket_path
    except ImportError:  # a version without the broker: the protocol's order, by hand
        pass
    else:
        return os.fspath(client_socket_path())
    candidates = []
    if os.environ.get("PREALLOC_SOCKET"):
        candidates.append(os.environ["PREALLOC_SOCKET"])
    root_socket = "/run/prealloc-broker/broker.sock"
    candidates.append(root_socket)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    own = (os.path.join(runtime, "prealloc-broker.sock") if runtime
           else f"/tmp/prealloc-broker-{os.getuid()}/broker.sock")
    candidates.append(own)
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    return candidates[0] if os.environ.get("PREALLOC_SOCKET") else root_socket if os.geteuid() == 0 else own


def _ask_broker(socket_path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the broker's status answer, None) or (None, why there is none)."""
    try:
        from .client import Client
    except ImportError:
        return None, f"the broker client (prealloc.client) is {NOT_AVAILABLE}"
    try:
        st = os.stat(socket_path)
    except FileNotFoundError:
        return None, f"no broker socket at {socket_path}"
    except OSError as exc:
        return None, f"cannot reach {socket_path}: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return None, f"{socket_path} is not a socket"
    client = None
    try:
        client = Client(socket_path=socket_path, timeout=BROKER_TIMEOUT_S)
        answer = client.status()
    except Exception as exc:  # a broker that refuses or misbehaves: say so, read locally
        return None, f"no broker answered at {socket_path}: {type(exc).__name__}: {exc}"
    finally:
        if client is not None:
            try:
                client.close()
            except OSError:
                pass
    if not isinstance(answer, dict):
        return None, f"the broker at {socket_path} answered status with {type(answer).__name__}, not an object"
    return answer, None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _broker_row(row: dict[str, Any]) -> dict[str, Any]:
    pid = row.get("owner_pid")
    start = row.get("owner_start")
    alive, command = _owner_facts(pid, start)
    cores = row.get("cores")
    if cores is None and isinstance(row.get("details"), dict):
        cores = row["details"].get("cores")
    return {
        "allocation_id": row.get("allocation_id"),
        "owner_pid": pid,
        "owner_start": start,
        "owner_uid": row.get("owner_uid"),
        "owner_alive": alive,
        "command": row.get("command") or command,
        "resource_type": row.get("resource_type"),
        "requested": _number(row.get("requested")),
        "effective": _number(row.get("effective")),
        "status": row.get("status"),
        "age_s": _number(row.get("age_s")),
        "expires_in_s": _number(row.get("expires_in_s")),
        "cores": sorted(cores) if isinstance(cores, list) else None,
        "origin": "broker",
    }


# ---------------------------------------------------------------------------------------
# the journal


def _cpu_list(cores: Any) -> str:
    if not isinstance(cores, list) or not all(isinstance(c, int) for c in cores):
        return "?"
    ids = sorted(set(cores))
    ranges: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        ranges.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(ranges) or "none"


def _field(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = data.get(key)
    return value if isinstance(value, kind) else default


def describe_entry(data: dict[str, Any]) -> tuple[str, int | None]:
    """(what the entry's side effect is, in words; the target pid where it has one)."""
    kind = str(data.get("kind", journal.KIND_AFFINITY))
    target: dict[str, Any] = _field(data, "target", dict, {})
    target_pid = target.get("pid") if isinstance(target.get("pid"), int) else None
    applied: list[Any] = _field(data, "applied", list, [])
    if kind in (journal.KIND_AFFINITY, journal.KIND_IOPRIO, "sched"):
        alive = owner_alive(target_pid, target.get("start"))
        gone = "" if alive else " (target gone)"
        what = {journal.KIND_AFFINITY: "CPU mask", journal.KIND_IOPRIO: "I/O priority"}.get(kind, "scheduling")
        if not applied:  # a summary (the broker's status sends kind, owner and target only)
            return f"{what} of process {target_pid}{gone}", target_pid
        threads = len(data["previous"]) if isinstance(data.get("previous"), dict) else 0
        value = (f"cpus {_cpu_list(applied[-1])}" if kind == journal.KIND_AFFINITY
                 else f"I/O priority {applied[-1]}" if kind == journal.KIND_IOPRIO
                 else f"scheduling [policy, rt priority, nice] {applied[-1]}")
        return f"process {target_pid} ({threads} thread(s)) set to {value}{gone}", target_pid
    if kind == "cpuset":  # prealloc.cpuset: other tasks moved off reserved cores
        count = len(_field(data, "moved", dict, {}))  # tid -> what to give back
        rest: list[Any] = _field(data, "rest", list, [])
        shrunk: list[Any] = _field(data, "shrunk", list, [])
        return (f"{count} task(s) moved off cpus {_cpu_list(data.get('reserved'))} under {data.get('root')} "
                f"({len(rest)} rest cgroup(s), {len(shrunk)} shrunk)"), None
    if kind == journal.KIND_RESERVE_FILE:
        return f"reserve file {data.get('path')}", None
    if kind == journal.KIND_CGROUP_WEIGHT:
        return f"I/O weight {data.get('applied')} (was {data.get('previous')}) in {data.get('path')}", None
    if kind == journal.KIND_TC_HTB:
        classes: list[Any] = _field(data, "classes", list, [])
        where = data.get("ifname")
        netns = data.get("netns")
        return (f"{len(classes)} HTB class(es) on {where}" + (f" in netns {netns}" if netns else "")), None
    return f"kind {kind!r}", None


def _entry_row(data: dict[str, Any], name: str | None, age_s: float | None, state: str | None,
               owners: _Owners | None = None) -> dict[str, Any]:
    owner: dict[str, Any] = _field(data, "owner", dict, {})
    pid, start = owner.get("pid"), owner.get("start")
    alive, command = (owners or _Owners())(pid, start)
    what, target_pid = describe_entry(data)
    if state is None:
        state = "live" if alive else "owner dead"
    return {"file": name, "kind": str(data.get("kind", journal.KIND_AFFINITY)), "owner_pid": pid,
            "owner_start": start, "owner_alive": alive, "command": command, "uid": data.get("uid"),
            "state": state, "age_s": age_s, "what": what, "target_pid": target_pid}


def read_journal(directory: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The journal's entries, read and never changed (see the module)."""
    owners = _Owners()
    folder = Path(directory) if directory is not None else journal.default_directory()
    result: dict[str, Any] = {"directory": str(folder), "available": True, "reason": None,
                              "entries": [], "set_aside": []}
    try:
        exists = journal.check_directory(folder, create=False)
    except journal.UntrustedJournalDirectory as exc:
        result.update(available=False, reason=str(exc))
        return result
    if not exists:
        result["reason"] = f"{folder} does not exist (nothing journaled since boot)"
        return result
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        result.update(available=False, reason=f"cannot list {folder}: {exc.strerror}")
        return result
    now = time.time()
    for name in names:
        path = folder / name
        if name.endswith(".bad"):
            result["set_aside"].append(name)
            continue
        # an entry (e-...json), or one a recoverer has claimed (e-....recovering-PID)
        claimed = ".recovering-" in name
        if not (name.endswith(".json") or claimed):
            continue
        try:
            data = journal.read_entry(path)
            age = now - os.stat(path).st_mtime
        except FileNotFoundError:
            continue  # undone (or claimed) between the listing and the read
        except (ValueError, TypeError, KeyError, OSError) as exc:
            result["entries"].append({"file": name, "kind": None, "owner_pid": None, "owner_start": None,
                                      "owner_alive": None, "command": None, "uid": None,
                                      "state": "unreadable", "age_s": None, "what": str(exc),
                                      "target_pid": None})
            continue
        if data is None:
            continue  # vanished, or not a file of ours (the reader logs it)
        recoverer = name.rsplit(".recovering-", 1)[1] if claimed else None
        result["entries"].append(_entry_row(data, name, age, f"being recovered by {recoverer}" if claimed else None,
                                            owners))
    return result


# ---------------------------------------------------------------------------------------
# the machine-wide core registry


def _registry_age(since: Any) -> float | None:
    value = _number(since)
    if value is None:
        return None
    return max(0.0, time.time() - value)


def read_core_registry(journal_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The machine-wide exclusive core holders, without taking any lock: the registry's
    own directory ($PREALLOC_REGISTRY_DIR, else the one that goes with the journal
    directory `journal_dir` names)."""
    result: dict[str, Any] = {"available": True, "reason": None, "directory": None, "scope": None, "holders": []}
    try:
        from . import machine_registry
    except ImportError:
        result.update(available=False, reason=f"the machine-wide core registry is {NOT_AVAILABLE}")
        return result
    directory = None
    if journal_dir is not None:
        directory = (machine_registry.shared_directory()
                     or machine_registry.registry_directory_for(journal_dir))
    try:
        registry = machine_registry.MachineCoreRegistry(directory=directory)
        holders = registry.holders()
    except OSError as exc:
        result.update(available=False, reason=f"cannot read the core registry: {exc}")
        return result
    result.update(directory=str(registry.directory), scope=registry.describe())
    for holder in holders:
        alive, command = _owner_facts(holder.pid, holder.start)
        result["holders"].append({"core": holder.core, "pid": holder.pid, "start": holder.start, "uid": holder.uid,
                                  "level": _plain(holder.level), "allocation_id": holder.allocation_id,
                                  "since": _number(holder.since), "alive": alive, "command": command,
                                  "confirmed": bool(getattr(holder, "confirmed", True))})
    result["holders"].sort(key=lambda h: (h["core"], h["pid"] or 0))
    return result


def _plain(value: Any) -> Any:
    """An enum's value, else the value itself: JSON-ready."""
    inner = getattr(value, "value", value)
    return inner if isinstance(inner, (str, int, float, bool)) or inner is None else str(inner)


def _registry_rows(cores: dict[str, Any]) -> list[dict[str, Any]]:
    """One reservation row per (holder process, allocation) of the registry."""
    groups: dict[tuple[Any, Any, Any], list[dict[str, Any]]] = {}
    for holder in cores["holders"]:
        groups.setdefault((holder["pid"], holder["start"], holder["allocation_id"]), []).append(holder)
    rows = []
    for (pid, start, allocation_id), held in groups.items():
        first = held[0]
        since = [h["since"] for h in held if h["since"] is not None]
        levels = sorted({str(h["level"]) for h in held if h["level"] is not None})
        rows.append({
            "allocation_id": allocation_id, "owner_pid": pid, "owner_start": start, "owner_uid": first["uid"],
            "owner_alive": first["alive"], "command": first["command"], "resource_type": "cpu",
            "requested": None, "effective": 100.0 * len(held),
            "status": ("held" if first["alive"] else "owner dead") + (f" ({', '.join(levels)})" if levels else ""),
            "age_s": _registry_age(min(since)) if since else None, "expires_in_s": None,
            "cores": sorted(h["core"] for h in held), "origin": "core_registry",
        })
    return rows


# ---------------------------------------------------------------------------------------
# the whole picture


def collect(*, socket_path: str | None = None, journal_dir: str | os.PathLike[str] | None = None,
            use_broker: bool = True) -> dict[str, Any]:
    """The status of this machine as a JSON-ready dict (the schema is the module's)."""
    path = socket_path if socket_path is not None else default_socket_path()
    answer, why_not = _ask_broker(path) if use_broker else (None, "not asked")
    cores = read_core_registry(journal_dir)
    data: dict[str, Any] = {"schema": SCHEMA_VERSION, "generated_at": time.time(),
                            "broker": {"socket": path, "answered": answer is not None, "reason": why_not}}
    if answer is not None:
        rows = [_broker_row(r) for r in answer.get("reservations") or [] if isinstance(r, dict)]
        entries = [_entry_row(e, e.get("name"), None, None) for e in answer.get("journal") or []
                   if isinstance(e, dict) and isinstance(e.get("owner"), dict)]
        detail = f"the broker at {path}"
        if os.geteuid() != 0:
            detail += " (it lists this uid's reservations, root's every one)"
        data.update(source="broker", source_detail=detail,
                    reservations=rows,
                    journal={"directory": None, "available": True, "reason": "the broker's journal",
                             "entries": entries, "set_aside": []},
                    quotas={"source": "broker",
                            "by_uid": {str(uid): dict(used) for uid, used in (answer.get("quotas") or {}).items()
                                       if isinstance(used, dict)},
                            "limits": answer.get("limits")})
    else:
        journal_state = read_journal(journal_dir)
        by_uid: dict[str, dict[str, float]] = {}
        for holder in cores["holders"]:
            if holder["alive"]:
                use = by_uid.setdefault(str(holder["uid"]), {})
                use["cpu"] = use.get("cpu", 0.0) + 100.0
        data.update(source="local",
                    source_detail=f"this machine's journal ({journal_state['directory']}) and core registry; "
                                  f"{why_not}",
                    reservations=_registry_rows(cores),
                    journal=journal_state,
                    quotas={"source": "core_registry", "by_uid": by_uid, "limits": None})
    data["cores"] = cores
    data["reservations"].sort(key=lambda r: (str(r["resource_type"]), str(r["allocation_id"])))
    return data


# ---------------------------------------------------------------------------------------
# the table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _duration(seconds: Any) -> str:
    value = _number(seconds)
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    return f"{value / 3600:.1f}h"


def _owner(pid: Any, alive: bool | None) -> str:
    return _cell(pid) + (" (dead)" if alive is False else "")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    lines = []
    for row in [headers] + rows:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths)] + [str(row[-1])]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def format_text(data: dict[str, Any]) -> str:
    """The human form of :func:`collect`'s dict."""
    parts = [f"source: {data['source_detail']}\n"]
    rows = data["reservations"]
    parts.append(f"\nreservations ({len(rows)})\n")
    if rows:
        parts.append(table(
            ["ID", "OWNER", "UID", "COMMAND", "TYPE", "REQUESTED", "EFFECTIVE", "STATE", "AGE", "EXPIRES IN"],
            [[_cell(r["allocation_id"]), _owner(r["owner_pid"], r["owner_alive"]), _cell(r["owner_uid"]),
              _cell(r["command"]), _cell(r["resource_type"]), _cell(r["requested"]),
              _cell(r["effective"]) + (f" (cpus {_cpu_list(r['cores'])})" if r["cores"] else ""),
              _cell(r["status"]), _duration(r["age_s"]),
              "never" if r["expires_in_s"] is None else _duration(r["expires_in_s"])] for r in rows]))
    elif data["source"] == "local":
        parts.append("  none recorded machine-wide (without a broker, memory and the other types are held "
                     "inside their processes)\n")
    j = data["journal"]
    where = f" {j['directory']}" if j["directory"] else ""
    parts.append(f"\njournal{where} ({len(j['entries'])} entries)\n")
    if not j["available"] or (j["reason"] and not j["entries"]):
        parts.append(f"  {j['reason']}\n")
    if j["entries"]:
        parts.append(table(["FILE", "KIND", "OWNER", "COMMAND", "STATE", "AGE", "WHAT"],
                           [[_cell(e["file"]), _cell(e["kind"]), _owner(e["owner_pid"], e["owner_alive"]),
                             _cell(e["command"]), _cell(e["state"]), _duration(e["age_s"]), e["what"]]
                            for e in j["entries"]]))
    if j["set_aside"]:
        parts.append(f"  set aside as unreadable: {', '.join(j['set_aside'])}\n")
    c = data["cores"]
    parts.append(f"\ncore registry ({len(c['holders'])} held" + (f"; {c['scope']}" if c["scope"] else "") + ")\n")
    if not c["available"]:
        parts.append(f"  {c['reason']}\n")
    elif c["holders"]:
        parts.append(table(["CORE", "HOLDER", "COMMAND", "UID", "LEVEL", "ALLOCATION", "HELD FOR"],
                           [[_cell(h["core"]), _owner(h["pid"], h["alive"]) + ("" if h["confirmed"] else " (unconfirmed)"),
                             _cell(h["command"]), _cell(h["uid"]),
                             _cell(h["level"]), _cell(h["allocation_id"]), _duration(_registry_age(h["since"]))]
                            for h in c["holders"]]))
    q = data["quotas"]
    parts.append(f"\nquota use by uid (from the {'broker' if q['source'] == 'broker' else 'core registry'})\n")
    use_rows = []
    for uid, used in sorted(q["by_uid"].items()):
        for resource_type, amount in sorted(used.items()):
            limit = None
            if isinstance(q["limits"], dict) and isinstance(q["limits"].get(uid), dict):
                limit = q["limits"][uid].get(resource_type)
            use_rows.append([uid, resource_type, _cell(_number(amount)), _cell(limit)])
    if use_rows:
        parts.append(table(["UID", "TYPE", "USED", "LIMIT"], use_rows))
    else:
        parts.append("  none\n")
    if q["limits"] is None and data["source"] == "local":
        parts.append("  (quota limits are the broker's: none without one)\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# the command


def run(*, as_json: bool = False, watch: float | None = None, count: int | None = None,
        socket_path: str | None = None, journal_dir: str | None = None, out: TextIO | None = None,
        sleep: Callable[[float], None] = time.sleep) -> int:
    """Prints the status once, or every `watch` seconds (`count` times, or until Ctrl-C,
    which ends it with status 0). The screen is cleared between refreshes only when out
    is a terminal; --json --watch prints one JSON document per line."""
    stream = out if out is not None else sys.stdout
    clear = watch is not None and stream.isatty()
    shown = 0
    try:
        while True:
            data = collect(socket_path=socket_path, journal_dir=journal_dir)
            if as_json:
                text = json.dumps(data, indent=None if watch is not None else 2, sort_keys=True) + "\n"
            else:
                text = format_text(data)
            stream.write((_CLEAR if clear else "") + text)
            stream.flush()
            shown += 1
            if watch is None or (count is not None and shown >= count):
                return 0
            if not clear and not as_json:
                stream.write("\n")
            sleep(watch)
    except KeyboardInterrupt:
        return 0
