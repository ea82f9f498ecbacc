"""The ``prealloc`` command line.

    prealloc demo [--scale S] [--seed N] [--rounds R] [--predictor trace|markov] [--lock] [--json] [-q] [-v]
    prealloc recover [--dir DIR] [--json]
    prealloc record --name NAME [--seconds S] [--dir DIR] [--method M] [--root DIR]... -- CMD ARGS...
    prealloc check-config FILE
    prealloc serve [--socket PATH] [--group G] [--config FILE] [--metrics ADDR]
    prealloc status [--json] [--watch [SECONDS]] [--socket PATH] [--dir DIR]
    prealloc doctor [--json] [--strict] [--socket PATH] [--dir DIR]

Subcommands are argparse subparsers, each registered by a ``_add_<name>`` function
that sets ``func`` (the handler, returning the exit status). Exit status: 0 on
success, 1 when a command failed, 2 for bad arguments or no command. What a command
prints on stdout is its output; diagnostics go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import textwrap
from typing import Any, Callable, Sequence, TextIO

from . import __version__, demo, journal

PROG = "prealloc"
MAX_SCALE = 100.0  # 4000 events over 5 minutes: beyond that a demo is a benchmark
MAX_ROUNDS = 1000


def _number_arg(low: float, high: float, *, above: bool = True, unit: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in (low, high] (above) or [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (math.isfinite(value) and (low < value if above else low <= value) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g} and <= {high:g}{unit}, "
                                             f"not {text}")
        return value

    return parse


def _integer_arg(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a decimal integer, within [low, high] where they are given."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = " and ".join(b for b in (f">= {low}" if low is not None else "",
                                              f"<= {high}" if high is not None else "") if b)
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value

    return parse


_scale = _number_arg(0, MAX_SCALE)
_rounds = _integer_arg(1, MAX_ROUNDS)
_seed = _integer_arg()
_seconds = _number_arg(0, 3600)  # record --seconds
_interval = _number_arg(0.1, 3600, above=False, unit=" seconds")  # status --watch
_refreshes = _integer_arg(1)  # status --count


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="log to stderr: -v for INFO, -vv for DEBUG")


def _add_demo(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "demo", help="compare preallocation with reactive allocation on this machine",
        description="Replays a built-in prediction trace on this machine with the real MEMORY and "
                    "CPU strategies through ResourcePreallocator (resources reserved when a "
                    "prediction arrives), ReactiveResourceAllocator (reserved when the need "
                    "arrives) and plain np.empty, interleaved over rounds, and compares the latency "
                    "from need to usable resource (a full first pass of writes), need_hit_rate, "
                    "resource_hit_rate and waste per resource type. What the trace holds at once is "
                    "bounded to min(25% of the available memory, 1 GiB) and to what the allocators' "
                    "headroom leaves. Progress goes to stderr.")
    parser.add_argument("--scale", type=_scale, default=1.0,
                        help="multiplies the number of events (default 1.0: about 40 over 3 s)")
    parser.add_argument("--seed", type=_seed, default=7, help="the trace's random seed (default 7)")
    parser.add_argument("--rounds", type=_rounds, default=demo.DEFAULT_ROUNDS,
                        help=f"replays of the trace per variant, interleaved (default {demo.DEFAULT_ROUNDS}; "
                             "more rounds, more samples behind the p99)")
    parser.add_argument("--predictor", choices=demo.PREDICTORS, default="trace",
                        help="where the preallocator's predictions come from: the trace's own (default), or "
                             "the built-in MarkovPredictor learning online from the needs (on a trace whose "
                             "applications follow a habit)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--lock", action="store_true", help="mlock the memory (best effort)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    # SUPPRESS: without -v here, the top-level -v (or its default) stands
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Reserve real machine resources ahead of a predicted need.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbose(parser, 0)
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_recover(subparsers)
    _add_record(subparsers)
    _add_check_config(subparsers)
    _add_status(subparsers)
    _add_doctor(subparsers)
    _add_serve(subparsers)
    return parser


# ---------------------------------------------------------------------------------------
# demo


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _by_type(counts: dict[str, Any], render: Callable[[Any], str] = str) -> str:
    return ", ".join(f"{name} {render(n)}" for name, n in counts.items()) or "-"


def format_table(data: dict[str, Any], out: TextIO) -> None:
    """The human form of report_as_dict's data."""
    m, t, runs = data["machine"], data["trace"], data["variants"]
    mlock = ("requested, " if m["mlock_requested"] else "not requested (--lock), ") + \
        ("would be effective" if m["mlock_effective"] and not m["mlock_requested"]
         else "effective" if m["mlock_effective"] else "NOT effective") + f" ({m['mlock_detail']})"
    out.write(f"machine: {m['cores_usable']} usable cores of {m['cores_online']} online, "
              f"{m['memory_available_mib']:.0f} MiB available of {m['memory_total_mib']:.0f} MiB, "
              f"THP {m['thp']}\n")
    out.write(f"mlock: {mlock}\n")
    out.write(f"trace: seed {t['seed']}, scale {t['scale']:g}: {t['events']} predictions over "
              f"{t['span_s']:.1f} s, {t['needs']} needs, {t['wrong']} wrong, {t['low_confidence']} below "
              f"min confidence {t['min_confidence']:g}; {data['rounds']} rounds, variants interleaved\n")
    out.write(f"memory scale: {t['memory_factor']:.3f} of the nominal sizes, so the trace's worst case holds "
              f"{t['peak_memory_mib']:.0f} MiB at once, within {t['memory_limit_mib']:.0f} MiB "
              f"(min of 25% of available, 1 GiB, and what the {t['memory_headroom']:.0%} headroom leaves)\n")
    out.write(f"cpu: {'exclusive' if t['cores_exclusive'] else 'shared'} cores (worst-case overlap "
              f"{t['peak_cores']} cores, {m['cores_usable']} usable)\n")
    apps = ", ".join(f"{name} {a['memory_mib']:.0f} MiB" + (f" + {a['cpu_percent']:.0f}% CPU"
                                                              if a['cpu_percent'] else "")
                     for name, a in t["apps"].items())
    out.write(f"apps: {apps}\n")
    out.write(f"usable: {data['usable']}; plain = np.empty + the pass, no CPU reservation\n\n")

    labels = list(runs)
    n = runs[labels[0]]["latency_ms"]["n"]

    def stat(name: str, render: Callable[[Any], str] = str) -> Callable[[dict[str, Any]], str]:
        return lambda r: render(r["statistics"][name]) if "statistics" in r else "-"

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("needs served", lambda r: f"{r['needs_served']} / {r['needs']}"),
        (f"latency p50 (ms, need to usable, n={n})", lambda r: _ms(r["latency_ms"]["p50"])),
        ("latency p90 (ms)", lambda r: _ms(r["latency_ms"]["p90"])),
        ("latency p99 (ms)", lambda r: _ms(r["latency_ms"]["p99"])),
        ("latency max (ms)", lambda r: _ms(r["latency_ms"]["max"])),
    ]
    def app_latency(app: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{_ms(r['latency_ms_by_app'][app]['p50'])} / {_ms(r['latency_ms_by_app'][app]['p99'])}"

    def count(key: str, reason: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: str(r.get(key, {}).get(reason, 0))

    for app in t["apps"]:
        rows.append((f"  {app} p50 / p99 (ms)", app_latency(app)))
    rows += [
        ("need_hit_rate (acquires served ready)",
         lambda r: f"{_pct(r['statistics']['need_hit_rate'])} ({r['statistics']['needs_preallocated']}/"
                   f"{r['statistics']['needs']})" if "statistics" in r else "-"),
        ("  claims ready, consumer's count",
         lambda r: f"{r['claims_preallocated']}/{r['claims']}" if "statistics" in r else "-"),
        ("resource_hit_rate (preallocations used)",
         lambda r: f"{_pct(r['statistics']['resource_hit_rate'])} ({r['statistics']['used']}/"
                   f"{r['statistics']['preallocations_finished']})" if "statistics" in r else "-"),
        ("waste_rate_by_type (unused amount x s)", stat("waste_rate_by_type", lambda w: _by_type(w, _pct))),
        ("allocations by type", stat("allocations_by_type", _by_type)),
        ("memory held at peak (MiB)", lambda r: f"{r['memory_peak_mib']:.0f}" if "statistics" in r else "-"),
        ("skipped low-confidence", stat("skipped_low_confidence")),
        ("expired", stat("expired")),
        ("failed allocations", stat("failed_allocations")),
    ]
    if m["mlock_requested"]:
        rows.append(("memory allocations locked",
                     lambda r: f"{r['memory_locked']} / {r['memory_allocations']}" if "statistics" in r else "-"))
    rows.append(("failed needs", lambda r: str(r["needs_failed"])))
    # each failure's reason, its own row: how many needs (or allocations) it failed
    for key, what in (("failures", "need"), ("allocation_failures", "allocation")):
        for reason in sorted({reason for r in runs.values() for reason in r.get(key, {})}):
            rows.append((f"  {what}: {reason}", count(key, reason)))
    cells = [[label] + [render(runs[name]) for name in labels] for label, render in rows]
    header = [""] + labels
    widths = [max(len(row[i]) for row in cells + [header]) for i in range(len(header))]
    for row in [header] + cells:
        out.write(row[0].ljust(widths[0]) + "".join("   " + c.rjust(w) for c, w in zip(row[1:], widths[1:]))
                  + "\n")
    out.write("\n")
    for other, ratio in data["ratios"].items():
        name = other.replace("_over_preallocated", "")
        out.write(f"{name} / preallocated: p50 "
                  + (f"{ratio['p50']:.2f}x" if ratio["p50"] is not None else "n/a") + ", p99 "
                  + (f"{ratio['p99']:.2f}x" if ratio["p99"] is not None else "n/a") + "\n")
    out.write("\n" + textwrap.fill(data["conclusion"], width=100) + "\n")


def _run_demo(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = demo.run_demo(scale=args.scale, seed=args.seed, lock=args.lock, rounds=args.rounds,
                           progress=None if args.quiet else progress, predictor=args.predictor)
    data = demo.report_as_dict(report)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        format_table(data, sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------
# recover


def _add_recover(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "recover", help="undo what a host that died without releasing left behind (CPU pins, cpuset moves, "
                        "scheduling policies, cgroup I/O weights, I/O priorities, reserve files, tc classes)",
        description="Reads the side-effect journal (prealloc.journal) and, for every entry whose owner "
                    "process is dead, undoes it: each thread of a target that still has the CPU mask or "
                    "I/O priority or scheduling policy the owner set gets its previous one back (threads "
                    "changed by someone else since are left alone), tasks a cpuset level moved off reserved "
                    "cores go back to their cgroups, a reserve file the owner created is removed, and so "
                    "are its traffic-control classes and filters (the last one takes its HTB root). "
                    "Entries of live owners are not touched. CPU and disk strategies do the same when "
                    "they start; this command is for operators and boot scripts.")
    parser.add_argument("--dir", default=None,
                        help=f"the journal directory (default: {journal.default_directory()})")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_recover)


def _run_recover(args: argparse.Namespace) -> int:
    try:
        results = journal.recover(args.dir)
    except journal.UntrustedJournalDirectory as exc:
        print(f"prealloc recover: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump([{"kind": r.kind, "target_pid": r.target_pid, "restored_threads": r.restored_threads,
                    "left_alone": r.left_alone, "target_gone": r.target_gone, "removed": r.removed}
                   for r in results],
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if not results:
        print("nothing to recover")
    for r in results:
        if r.kind == journal.KIND_RESERVE_FILE:
            print(f"reserve file {r.removed}: removed" if r.removed else
                  "reserve file: " + ("already gone" if r.target_gone else "replaced by another file; left alone"))
        elif r.kind == journal.KIND_CGROUP_WEIGHT:
            print(f"cgroup weight {r.removed}: restored" if r.removed else
                  "cgroup weight: " + ("cgroup gone" if r.target_gone else "changed by someone else since; left alone"))
        elif r.kind == journal.KIND_TC_HTB:
            print(f"traffic control {r.removed}: removed" if r.removed else
                  "traffic control: " + ("interface or namespace gone" if r.target_gone else "left alone"))
        elif r.kind == journal.KIND_CPUSET:
            print("cpuset: cgroups gone; entry removed" if r.target_gone else
                  f"cpuset: {len(r.restored_threads)} task(s) back on every core they had"
                  + (f", {r.removed} removed" if r.removed else "")
                  + (f", left {len(r.left_alone)} cgroup(s) changed by someone else" if r.left_alone else ""))
        elif r.target_gone:
            print(f"process {r.target_pid}: gone; entry removed")
        else:
            what = {journal.KIND_AFFINITY: "CPU mask", journal.KIND_SCHED: "scheduling policy"}.get(r.kind, "I/O priority")
            print(f"process {r.target_pid}: restored the {what}"
                  f" of {len(r.restored_threads)} thread(s)"
                  + (f", left {len(r.left_alone)} changed by someone else" if r.left_alone else ""))
    return 0


# ---------------------------------------------------------------------------------------
# record

def _add_record(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "record", help="run a program once and store the files it read as a CACHE_SPACE profile",
        description="Runs CMD once and records the regular files its process tree opened during its "
                    "first --seconds, as a profile that rules and requests name with profile = NAME. "
                    "fanotify is used where permitted (root), else strace where installed and allowed to "
                    "trace, else /proc/PID/maps and fd sampling, which can miss a file opened and closed "
                    "between two samples; the output says which.")
    parser.add_argument("--name", required=True, help="the profile's name")
    parser.add_argument("--seconds", type=_seconds, default=5.0,
                        help="record this long (the program is stopped after it; default 5)")
    parser.add_argument("--dir", default=None, help="the profile directory (default: "
                        "$PREALLOC_PROFILE_DIR or ~/.local/share/prealloc/profiles)")
    parser.add_argument("--method", choices=("auto", "fanotify", "strace", "proc"), default="auto")
    parser.add_argument("--root", action="append", default=None,
                        help="keep only files under this directory (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the profile as JSON")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_record)


def _run_record(args: argparse.Namespace) -> int:
    from . import profiles

    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        print("prealloc record: give the command after --", file=sys.stderr)
        return 2
    try:
        profile = profiles.record(command, name=args.name, seconds=args.seconds, directory=args.dir,
                                  method=args.method, roots=args.root)
    except ValueError as exc:
        print(f"prealloc record: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"prealloc record: {exc}", file=sys.stderr)
        return 1
    path = profiles.profile_path(profile.name, args.dir)
    if args.json:
        json.dump(profile.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(f"recorded {len(profile.files)} files ({profile.total_bytes / (1 << 20):.1f} MiB) "
              f"with {profile.method} into {path}")
    return 0


# ---------------------------------------------------------------------------------------
# check-config


def _add_check_config(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "check-config", help="validate a configuration (or rules) TOML file",
        description="Loads FILE as a PreallocatorConfig (prealloc.config_file; a file of [[rule]] only is "
                    "checked as a rules file) and prints OK, or every problem found, each naming its key, "
                    "on stderr with exit status 1.")
    parser.add_argument("file", metavar="FILE", help="the TOML file")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_check_config)


def _run_check_config(args: argparse.Namespace) -> int:
    from . import config_file

    errors = config_file.check_file(args.file)
    if errors:
        for error in errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1
    document = config_file.read_toml(args.file)
    if set(document) == {"rule"}:
        count = len(document["rule"])
        print(f"OK: {args.file}: rules file, {count} rule{'s' if count != 1 else ''}")
    else:
        print(f"OK: {args.file}: configuration")
    return 0


# ---------------------------------------------------------------------------------------
# status and doctor (prealloc.status, prealloc.doctor: imported when the command runs)


def _add_status(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "status", help="list the live reservations, journal entries, core holders and quota use of this machine",
        description="Asks the machine broker (prealloc serve) for its status when one answers on the socket; "
                    "else reads this machine's side-effect journal and core registry (nothing is changed: "
                    "prealloc recover undoes what dead owners left). The output says which source was used. "
                    "An owner is dead when no process has its pid and start time.")
    parser.add_argument("--json", action="store_true", help="print one JSON object (schema: prealloc.status)")
    parser.add_argument("--watch", nargs="?", type=_interval, const=2.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    parser.add_argument("--count", type=_refreshes, default=None, help=argparse.SUPPRESS)  # --watch N times
    parser.add_argument("--socket", default=None, help="the broker's socket (default: as prealloc.client finds it)")
    parser.add_argument("--dir", default=None, help="the journal directory (default: as prealloc recover's)")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from . import status

    return status.run(as_json=args.json, watch=args.watch, count=args.count, socket_path=args.socket,
                      journal_dir=args.dir)


def _add_doctor(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "doctor", help="say what this machine allows this process (mlock, huge pages, cgroups, RT, GPUs, ...)",
        description="Checks what this process may do here — mlock and RLIMIT_MEMLOCK, transparent huge pages, "
                    "MADV_POPULATE_WRITE, cachestat, PSI, cgroups and cpusets, isolated cpus, real-time "
                    "scheduling, NVML and CUDA, CAP_NET_ADMIN and iproute2, the journal directory, the broker "
                    "— trying each where that changes nothing, and gives the reason for every no. Exit status "
                    "0; with --strict 1 when something the default configuration needs is missing (memory "
                    "reservation, CPU affinity, a usable journal directory).")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a check the default configuration needs says no")
    parser.add_argument("--socket", default=None, help="the broker's socket to try")
    parser.add_argument("--dir", default=None, help="the journal directory to check")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    return doctor.run(as_json=args.json, strict=args.strict, journal_dir=args.dir, socket_path=args.socket)


# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: argparse prints usage and exits 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    # Without -v only errors are logged: what the library warns about during a demo
    # (a request dropped at its deadline, a need not served) is counted in its output.
    level = {0: logging.ERROR, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # the reader went away (| head): send the rest of our output, and the flush at
        # exit, to /dev/null rather than fail a second time
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed run is exit 1 with its reason, not a traceback
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=True)
        print(f"{PROG} {args.command}: error: {type(exc).__name__}: {exc}"
              + ("" if args.verbose else " (-v for the traceback)"), file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------
# serve


def _add_serve(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "serve", help="run the machine broker (one owner of this machine's reservations) in the foreground",
        description="Runs the machine broker: one engine that owns this machine's reservations, serving "
                    "client processes (prealloc.client.Client, <prealloc/client.h>) over a SOCK_SEQPACKET "
                    "Unix socket (docs/protocol.md). Peers are identified by SO_PEERCRED; each sees only "
                    "its own allocations, which are released when it disconnects. Logs to stderr; SIGHUP "
                    "reloads the config file, SIGTERM drains and exits 0. Under systemd socket activation "
                    "(LISTEN_FDS) the inherited socket is used.")
    parser.add_argument("--socket", metavar="PATH", default=None,
                        help="the socket to listen on (default: $PREALLOC_SOCKET, else "
                             "/run/prealloc-broker/broker.sock as root, else the runtime dir)")
    parser.add_argument("--group", metavar="G", default=None,
                        help="the group the socket (mode 0660) belongs to: who may connect besides the owner")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="the broker's TOML config (rate_limit, quotas per uid, [engine]; see prealloc.server)")
    parser.add_argument("--metrics", metavar="ADDR", default=None,
                        help="serve Prometheus metrics on HOST:PORT (the prometheus extra)")
    _add_verbose(parser, argparse.SUPPRESS)
    parser.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from . import server

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)  # a daemon says what it does
    return server.serve(args.socket, config_path=args.config, group=args.group, metrics_address=args.metrics)


if __name__ == "__main__":
    sys.exit(main())
