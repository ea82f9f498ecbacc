"""The ``prealloc`` command line and its demo: run as a user runs them (subprocesses),
plus unit tests of the trace generator and the percentile helper.

No timing assertions: whether preallocation is faster is what the demo measures and
prints, not something a test can promise on every machine."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prealloc import cli
from prealloc.demo import (
    APPS,
    DURATION_S,
    LOW_CONFIDENCE_SHARE,
    MIN_CONFIDENCE,
    MIN_EVENTS,
    SIZER_MARGIN,
    TIMING_SLACK_S,
    WRONG_SHARE,
    Machine,
    _peak,
    build_translator,
    generate_trace,
    percentile,
)
from prealloc.types import Prediction, ResourceType

RSS_SLACK_MIB = 16  # threads, interpreter caches; one leaked allocation of the demo is larger
SMALL = ["demo", "--scale", "0.25"]
TIMEOUT = 120


def run_cli(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = (executable or [sys.executable, "-m", "prealloc"]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def demo_json() -> dict:
    result = run_cli(*SMALL, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------------------------
# the demo, end to end


def test_demo_json_has_both_allocators_with_the_expected_keys(demo_json):
    assert set(demo_json) == {"machine", "trace", "allocators", "p50_ratio", "rss_mib"}
    assert set(demo_json["allocators"]) == {"preallocated", "reactive"}
    keys = {"allocator", "needs", "needs_served", "needs_failed", "claims", "claims_preallocated",
            "claims_not_preallocated", "hit_rate", "engine_hit_rate", "waste_rate", "latency_ms",
            "allocations_by_type", "total_requests", "successful_allocations", "failed_allocations",
            "skipped_low_confidence", "expired", "claimed", "released", "memory_allocations",
            "memory_locked", "memory_peak_mib", "live_before_close", "live_after_close"}
    for run in demo_json["allocators"].values():
        assert keys <= set(run)
        assert set(run["latency_ms"]) >= {"p50", "p99", "max"}
    assert demo_json["allocators"]["preallocated"]["allocator"] == "ResourcePreallocator"
    assert demo_json["allocators"]["reactive"]["allocator"] == "ReactiveResourceAllocator"
    machine = demo_json["machine"]
    assert machine["cores_usable"] >= 1 and machine["memory_available_mib"] > 0
    assert machine["thp"] in {"always", "madvise", "never", "unavailable", "unknown"}
    assert machine["mlock_requested"] is False and isinstance(machine["mlock_effective"], bool)


def test_the_preallocator_serves_needs_from_preallocations_and_pays_with_waste(demo_json):
    pre = demo_json["allocators"]["preallocated"]
    assert pre["hit_rate"] > 0 and pre["claims_preallocated"] > 0
    assert 0 < pre["waste_rate"] <= 1
    trace = demo_json["trace"]
    assert pre["skipped_low_confidence"] == trace["low_confidence"] >= 1
    assert pre["needs"] == trace["needs"]


def test_the_reactive_allocator_serves_the_same_needs_with_nothing_preallocated(demo_json):
    pre, reactive = demo_json["allocators"]["preallocated"], demo_json["allocators"]["reactive"]
    assert reactive["needs"] == pre["needs"]
    assert reactive["needs_served"] == pre["needs_served"] == pre["needs"]
    assert reactive["claims_preallocated"] == 0
    assert reactive["claims_not_preallocated"] == reactive["claims"] > 0
    assert reactive["hit_rate"] == 0
    assert reactive["skipped_low_confidence"] == 0 and reactive["expired"] == 0
    # every need asks for memory once, and each claim of the reactive run is its own allocation
    assert reactive["allocations_by_type"]["MEMORY"] == reactive["needs_served"]
    assert reactive["successful_allocations"] == reactive["claims"]


@pytest.mark.parametrize("label", ["preallocated", "reactive"])
def test_the_counts_are_consistent(demo_json, label):
    run = demo_json["allocators"][label]
    assert run["needs_served"] + run["needs_failed"] == run["needs"]
    assert run["claims_preallocated"] + run["claims_not_preallocated"] == run["claims"]
    assert run["claims_preallocated"] <= run["claims"]
    assert run["claimed"] == run["claims"]  # the engine saw every claim the consumer made
    assert 0 <= run["hit_rate"] <= 1 and 0 <= run["engine_hit_rate"] <= 1 and 0 <= run["waste_rate"] <= 1
    assert run["total_requests"] == run["successful_allocations"] + run["failed_allocations"]
    assert sum(run["allocations_by_type"].values()) == run["successful_allocations"]
    assert set(run["allocations_by_type"]) <= {"MEMORY", "CPU"}
    assert run["allocations_by_type"]["MEMORY"] == run["memory_allocations"]
    # the statistics are read once every allocation has ended, by release or by expiry
    assert run["live_before_close"] == 0
    assert run["released"] + run["expired"] == run["successful_allocations"]
    assert run["released"] >= run["claimed"]
    latency = run["latency_ms"]
    assert 0 <= latency["p50"] <= latency["p99"] <= latency["max"]


def test_memory_stays_within_the_safe_share_and_nothing_leaks(demo_json):
    trace = demo_json["trace"]
    assert trace["peak_memory_mib"] <= trace["memory_limit_mib"] + 1e-6
    assert trace["memory_limit_mib"] <= min(0.25 * demo_json["machine"]["memory_available_mib"], 1024) + 0.1
    for run in demo_json["allocators"].values():
        assert 0 < run["memory_peak_mib"] <= trace["memory_limit_mib"] + 1  # the bound held in the run
        assert run["live_after_close"] == 0
    rss = demo_json["rss_mib"]  # VmRSS of the demo process, before the runs and after both closed
    assert rss["after"] - rss["before"] <= RSS_SLACK_MIB


def test_the_table_through_the_console_script():
    script = Path(sys.executable).parent / "prealloc"
    command = str(script) if script.exists() else shutil.which("prealloc")
    if command is None:
        pytest.skip("the prealloc console script is not installed")
    result = run_cli(*SMALL, executable=[command])
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("machine: ")
    for text in ("mlock:", "memory scale:", "preallocated", "reactive", "needs served", "latency p50",
                 "latency p99", "latency max", "hit rate", "waste rate", "allocations by type", "failed",
                 "skipped low-confidence", "expired", "p50 ratio (reactive / preallocated)"):
        assert text in out, text
    assert "memory allocations locked" not in out  # only with --lock


@pytest.mark.parametrize("args", [["demo", "--scale", "0.1", "--json", "-v"],
                                  ["-v", "demo", "--scale", "0.1", "--json"]])
def test_verbose_logs_to_stderr_and_leaves_stdout_json(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    assert "INFO" in result.stderr and "replaying" in result.stderr


# ---------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize("args, message", [
    (["demo", "--scale", "0"], "--scale"),
    (["demo", "--scale", "-1"], "--scale"),
    (["demo", "--scale", "nan"], "--scale"),
    (["demo", "--scale", "1000"], "--scale"),
    (["demo", "--scale", "abc"], "not a number"),
    (["demo", "--seed", "1.5"], "--seed"),
    (["demo", "--bogus"], "unrecognized arguments"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_subcommand_prints_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "usage: prealloc" in result.stderr and "demo" in result.stderr


def test_help_exits_0():
    result = run_cli("--help")
    assert result.returncode == 0 and "demo" in result.stdout
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    for flag in ("--scale", "--seed", "--lock", "--json", "--verbose"):
        assert flag in result.stdout


def test_a_run_that_raises_exits_1(monkeypatch, capsys):
    def broken(**kwargs):
        raise RuntimeError("the machine said no")

    monkeypatch.setattr("prealloc.demo.run_demo", broken)
    assert cli.main(["demo", "--scale", "0.1"]) == 1
    assert "the machine said no" in capsys.readouterr().err


def test_too_little_memory_is_an_error_not_a_squeezed_run(monkeypatch, capsys):
    starved = Machine(cores_usable=1, cores_online=1, memory_total_mib=4096, memory_available_mib=420, thp="never")
    monkeypatch.setattr(Machine, "probe", classmethod(lambda cls: starved))
    assert cli.main(["demo", "--scale", "0.1"]) == 1
    assert "too little memory available" in capsys.readouterr().err


def test_the_safe_share_is_the_least_of_a_quarter_a_gib_and_the_headroom():
    def machine(total: float, available: float) -> Machine:
        return Machine(cores_usable=1, cores_online=1, memory_total_mib=total, memory_available_mib=available,
                       thp="never")

    assert machine(65536, 32768).safe_memory_mib(0.1) == 1024  # the cap
    assert machine(8192, 2048).safe_memory_mib(0.1) == 512  # a quarter of what is available
    assert machine(8192, 1000).safe_memory_mib(0.1) == pytest.approx(1000 - 819.2)  # the headroom
    assert machine(8192, 500).safe_memory_mib(0.1) == 0


# ---------------------------------------------------------------------------------------
# the trace generator


def test_the_trace_is_deterministic_for_a_seed():
    a = generate_trace(7, 1.0, memory_limit_mib=512, cores=4)
    b = generate_trace(7, 1.0, memory_limit_mib=512, cores=4)
    assert a == b
    c = generate_trace(8, 1.0, memory_limit_mib=512, cores=4)
    assert [e.at for e in c.events] != [e.at for e in a.events]


@pytest.mark.parametrize("scale, count", [(1.0, 40), (0.25, 10), (2.0, 80), (0.01, MIN_EVENTS)])
def test_scale_multiplies_the_number_of_events_at_the_same_rate(scale, count):
    trace = generate_trace(3, scale, memory_limit_mib=1024, cores=2)
    assert len(trace.events) == count
    assert [e.index for e in trace.events] == list(range(count))
    assert all(a.at <= b.at for a, b in zip(trace.events, trace.events[1:]))
    assert trace.span <= count * 0.075
    for e in trace.events:
        assert 0.080 <= e.lead <= 0.300 and 0.050 <= e.hold <= 0.300 and 0.6 <= e.use <= 1.0


@pytest.mark.parametrize("limit", [1024.0, 300.0, 50.0, 1.0])
@pytest.mark.parametrize("seed", [1, 7, 42])
def test_sizes_are_bounded_by_the_safe_share(limit, seed):
    trace = generate_trace(seed, 1.0, memory_limit_mib=limit, cores=2)
    assert trace.peak_memory_mib <= limit * (1 + 1e-9)
    assert 0 < trace.memory_factor <= 1
    nominal = {app.name: app.memory_mib for app in APPS}
    for name, app in trace.apps.items():
        assert app.memory_mib == pytest.approx(nominal[name] * trace.memory_factor)
    for e in trace.events:
        assert 0 < e.need_mib <= trace.apps[e.app].memory_mib
        assert e.need_mib == pytest.approx(trace.apps[e.app].memory_mib * e.use)
    # the bound covers everything a run can hold at one instant: every confident
    # prediction's preallocation (at most (1 + margin) x nominal) until its latest
    # expiry, plus every need's claim
    worst = []
    for e in trace.events:
        size = trace.apps[e.app].memory_mib * (1 + SIZER_MARGIN)
        if e.confidence >= MIN_CONFIDENCE:
            worst.append((e.at, e.at + e.lead + DURATION_S + TIMING_SLACK_S, size))
        if e.arrives:
            worst.append((e.at + e.lead, e.at + e.lead + e.hold + TIMING_SLACK_S, size))
    assert _peak(worst) <= limit * (1 + 1e-9)


def test_a_generous_limit_leaves_sizes_alone():
    trace = generate_trace(7, 0.25, memory_limit_mib=1e9, cores=2)
    assert trace.memory_factor == 1.0
    assert {a.name: a.memory_mib for a in trace.apps.values()} == {a.name: a.memory_mib for a in APPS}


@pytest.mark.parametrize("scale", [0.25, 1.0, 4.0])
def test_wrong_and_low_confidence_shares_are_as_designed(scale):
    for seed in range(5):
        trace = generate_trace(seed, scale, memory_limit_mib=1024, cores=2)
        n = len(trace.events)
        assert trace.wrong == max(1, round(WRONG_SHARE * n))
        assert trace.low_confidence == max(1, round(LOW_CONFIDENCE_SHARE * n))
        assert abs(trace.wrong / n - WRONG_SHARE) <= 0.05
        assert abs(trace.low_confidence / n - LOW_CONFIDENCE_SHARE) <= 0.05
        # the two are different predictions: an unsure prediction is right, so the
        # preallocator that skipped it misses its need
        assert all(e.arrives for e in trace.events if e.low_confidence)
        assert len(trace.needs) == n - trace.wrong
        for e in trace.events:
            assert 0 < e.confidence < 1
            assert (e.confidence < MIN_CONFIDENCE) == e.low_confidence


def test_cpu_needs_are_capped_at_the_cores():
    one = generate_trace(7, 1.0, memory_limit_mib=1024, cores=1)
    assert max(a.cpu_percent for a in one.apps.values()) == 100
    many = generate_trace(7, 1.0, memory_limit_mib=1024, cores=64)
    assert {a.name: a.cpu_percent for a in many.apps.values()} == {a.name: a.cpu_percent for a in APPS}
    assert many.peak_cores >= 1


def test_bad_trace_arguments_raise():
    with pytest.raises(ValueError):
        generate_trace(7, 0)
    with pytest.raises(ValueError):
        generate_trace(7, float("inf"))
    with pytest.raises(ValueError):
        generate_trace(7, 1.0, memory_limit_mib=0)
    with pytest.raises(ValueError):
        generate_trace(7, 1.0, cores=0)


def test_the_translator_asks_for_each_apps_resources():
    trace = generate_trace(7, 1.0, memory_limit_mib=256, cores=2)
    translator = build_translator(trace.apps.values())
    for app in trace.apps.values():
        requests = translator.translate(Prediction(id="p", type="app_launch", predicted_value=app.name,
                                                   confidence=0.9, target_application=app.name))
        needs = {r.resource_type: r.predicted_need for r in requests}
        expected = {ResourceType.MEMORY: app.memory_mib}
        if app.cpu_percent:
            expected[ResourceType.CPU] = app.cpu_percent
        assert needs == expected
        assert all(r.duration == DURATION_S for r in requests)
    assert translator.translate(Prediction(id="q", type="app_launch", predicted_value="x", confidence=0.9,
                                           target_application="unknown")) == []


# ---------------------------------------------------------------------------------------
# helpers


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [1, 2, 3, 4], list(range(100, 0, -3)),
                                    [0.5, 0.25, 8.0, 8.0, 1e6, 3.0, 2.0]])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([1, 2, 3], 0) == 1 and percentile([1, 2, 3], 100) == 3
    assert percentile([10, 20], 50) == 15
    for q in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError):
            percentile([1], q)


def test_peak_of_intervals():
    assert _peak([]) == 0
    assert _peak([(0, 1, 5), (1, 2, 7)]) == 7  # touching intervals do not overlap
    assert _peak([(0, 2, 5), (1, 3, 7), (2.5, 4, 1)]) == 12
    assert _peak([(0, 10, 1)] * 4) == 4
