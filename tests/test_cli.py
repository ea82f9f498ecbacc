"""The ``prealloc`` command line and its demo: run as a user runs them (subprocesses),
plus unit tests of the trace generator, the serving path and the percentile helper.

No timing assertions: whether preallocation is faster is what the demo measures and
prints, not something a test can promise on every machine — nor whether a prediction's
allocation is ready before its need on a busy machine. The tests that need a hit make
it certain first (``wait_ready``), and check what the process itself did."""
from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prealloc import ResourcePreallocator, ReactiveResourceAllocator, cli
from prealloc.demo import (
    APPS,
    DURATION_S,
    LOW_CONFIDENCE_SHARE,
    MIN_CONFIDENCE,
    MIN_EVENTS,
    PLAIN,
    PREALLOCATED,
    REACTIVE,
    SIZER_MARGIN,
    TIMING_SLACK_S,
    VARIANTS,
    WRITE_BYTE,
    WRONG_SHARE,
    DemoReport,
    Machine,
    VariantResult,
    _first_pass,
    _NeedOutcome,
    _peak,
    _serve,
    _serve_plain,
    _strategies,
    build_translator,
    generate_trace,
    percentile,
    run_demo,
)
from prealloc.types import Prediction, ResourceType

RSS_SLACK_MIB = 16  # threads, interpreter caches; one leaked allocation of the demo is larger
ROUNDS = 2
SMALL = ["demo", "--scale", "0.25", "--rounds", str(ROUNDS)]
TIMEOUT = 180


def run_cli(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = (executable or [sys.executable, "-m", "prealloc"]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.fixture(scope="module")
def demo_run() -> subprocess.CompletedProcess[str]:
    result = run_cli(*SMALL, "--json")
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def demo_json(demo_run) -> dict:
    return json.loads(demo_run.stdout)


ALLOCATORS = (PREALLOCATED, REACTIVE)


# ---------------------------------------------------------------------------------------
# the demo, end to end


def test_demo_json_has_the_three_variants_with_the_expected_keys(demo_json):
    assert set(demo_json) == {"machine", "trace", "rounds", "order", "usable", "variants", "ratios",
                              "apps_where_plain_wins", "conclusion", "rss_mib"}
    assert list(demo_json["variants"]) == list(VARIANTS) == [PREALLOCATED, REACTIVE, PLAIN]
    keys = {"allocator", "needs", "needs_served", "needs_failed", "failures", "latency_ms", "latency_ms_by_app",
            "wall_s", "schedule_lag_max_ms"}
    allocator_keys = {"claims", "claims_preallocated", "statistics", "allocation_failures", "memory_allocations",
                      "memory_locked", "memory_peak_mib", "live_before_close", "live_after_close",
                      "learned_sizes_mib"}
    # the statistics under the names PreallocatorStatistics gives them
    statistics_keys = {"need_hit_rate", "resource_hit_rate", "waste_rate_by_type", "resource_waste_rate",
                       "needs", "needs_preallocated", "finished", "preallocations_finished", "used", "total_requests",
                       "successful_allocations", "failed_allocations", "cancelled", "expired", "released",
                       "claimed", "skipped_low_confidence", "allocations_by_type"}
    for label, run in demo_json["variants"].items():
        assert keys <= set(run)
        assert set(run["latency_ms"]) >= {"n", "p50", "p90", "p99", "max"}
        assert set(run["latency_ms_by_app"]) == set(demo_json["trace"]["apps"])
        if label == PLAIN:
            assert not allocator_keys & set(run)  # np.empty keeps no statistics
        else:
            assert allocator_keys <= set(run) and statistics_keys <= set(run["statistics"])
    assert demo_json["variants"][PREALLOCATED]["allocator"] == "ResourcePreallocator"
    assert demo_json["variants"][REACTIVE]["allocator"] == "ReactiveResourceAllocator"
    assert demo_json["variants"][PLAIN]["allocator"] == "numpy.empty"
    assert set(demo_json["ratios"]) == {"reactive_over_preallocated", "plain_over_preallocated"}
    machine = demo_json["machine"]
    assert machine["cores_usable"] >= 1 and machine["memory_available_mib"] > 0
    assert machine["thp"] in {"always", "madvise", "never", "unavailable", "unknown"}
    assert machine["mlock_requested"] is False and isinstance(machine["mlock_effective"], bool)


def test_the_variants_are_interleaved_over_the_rounds(demo_json):
    assert demo_json["rounds"] == ROUNDS
    order = demo_json["order"]
    assert len(order) == ROUNDS
    for r, this_round in enumerate(order):
        assert sorted(this_round) == sorted(VARIANTS)  # each variant once a round
        assert this_round == list(VARIANTS[r % 3:] + VARIANTS[:r % 3])  # rotated
    for run in demo_json["variants"].values():
        assert len(run["wall_s"]) == ROUNDS


@pytest.mark.parametrize("label", VARIANTS)
def test_every_need_of_every_round_is_counted_and_each_failure_has_a_reason(demo_json, label):
    run, trace = demo_json["variants"][label], demo_json["trace"]
    assert run["needs"] == ROUNDS * trace["needs"]
    assert run["needs_served"] + run["needs_failed"] == run["needs"]
    assert sum(run["failures"].values()) == run["needs_failed"]
    assert all(reason for reason in run["failures"])
    latency = run["latency_ms"]
    assert latency["n"] == run["needs_served"]
    assert sum(a["n"] for a in run["latency_ms_by_app"].values()) == latency["n"]
    if latency["n"]:
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


@pytest.mark.parametrize("label", ALLOCATORS)
def test_the_statistics_add_up_and_agree_with_what_the_consumers_saw(demo_json, label):
    run = demo_json["variants"][label]
    s = run["statistics"]
    assert run["claims_preallocated"] <= run["claims"]
    assert s["claimed"] == run["claims"]  # the engine saw every claim the consumers made
    assert s["total_requests"] == (s["successful_allocations"] + s["failed_allocations"] + s["cancelled"]
                                   + s["queued_requests"] + s["in_flight"])
    # read once every allocation had ended, by release or by expiry
    assert run["live_before_close"] == 0 and s["active_allocations"] == 0
    assert s["queued_requests"] == s["in_flight"] == 0
    assert s["released"] + s["expired"] == s["successful_allocations"] == s["finished"]
    assert 0 <= s["used"] <= s["preallocations_finished"] <= s["finished"]
    assert sum(s["allocations_by_type"].values()) == s["successful_allocations"]
    assert set(s["allocations_by_type"]) <= {"MEMORY", "CPU"}
    assert s["allocations_by_type"].get("MEMORY", 0) == run["memory_allocations"]
    assert sum(run["allocation_failures"].values()) == s["failed_allocations"]
    for rate in ("need_hit_rate", "resource_hit_rate", "resource_waste_rate"):
        assert 0 <= s[rate] <= 1
    assert set(s["waste_rate_by_type"]) <= {"MEMORY", "CPU"}
    assert all(0 <= w <= 1 for w in s["waste_rate_by_type"].values())
    # need_hit_rate is the consumers' own count: acquire() calls, those served ready
    assert s["needs"] >= run["claims"] and s["needs_preallocated"] == run["claims_preallocated"]
    if s["needs"]:
        assert s["need_hit_rate"] == pytest.approx(s["needs_preallocated"] / s["needs"], abs=1e-4)
    if s["preallocations_finished"]:
        assert s["resource_hit_rate"] == pytest.approx(s["used"] / s["preallocations_finished"], abs=1e-4)


def test_the_preallocator_skips_unsure_predictions_and_the_reactive_one_preallocates_nothing(demo_json):
    pre, reactive = demo_json["variants"][PREALLOCATED], demo_json["variants"][REACTIVE]
    trace = demo_json["trace"]
    assert pre["statistics"]["skipped_low_confidence"] == ROUNDS * trace["low_confidence"] >= ROUNDS
    assert reactive["claims_preallocated"] == 0 and reactive["statistics"]["needs_preallocated"] == 0
    assert reactive["statistics"]["need_hit_rate"] == 0
    s = reactive["statistics"]
    assert s["skipped_low_confidence"] == 0 and s["expired"] == 0
    # each claim of the reactive run is its own allocation, made at the need
    assert s["successful_allocations"] == reactive["claims"]
    assert s["allocations_by_type"].get("MEMORY", 0) == reactive["needs_served"]


def test_memory_stays_within_the_safe_share_and_nothing_leaks(demo_json):
    trace = demo_json["trace"]
    assert trace["peak_memory_mib"] <= trace["memory_limit_mib"] + 1e-6
    assert trace["memory_limit_mib"] <= min(0.25 * demo_json["machine"]["memory_available_mib"], 1024) + 0.1
    for label in ALLOCATORS:
        run = demo_json["variants"][label]
        assert run["memory_peak_mib"] <= trace["memory_limit_mib"] + 1  # the bound held in the run
        assert run["live_after_close"] == 0
    # VmRSS of the demo process, before the runs and after all closed, less what glibc's
    # malloc keeps free (resident) from the plain variant's np.empty buffers: a leaked
    # preallocation is a mapping of its own, never in malloc's free lists
    rss = demo_json["rss_mib"]
    cached = max(0.0, (rss["malloc_free_after"] or 0.0) - (rss["malloc_free_before"] or 0.0))
    assert rss["after"] - rss["before"] - cached <= RSS_SLACK_MIB


def test_the_conclusion_states_the_figures(demo_json):
    text = demo_json["conclusion"]
    n = demo_json["variants"][PREALLOCATED]["latency_ms"]["n"]
    assert f"n={n} needs" in text and "p99" in text and "np.empty" in text and "need_hit_rate" in text
    for name in demo_json["apps_where_plain_wins"]:
        assert name in text and "loses to the plain path" in text


def test_progress_is_printed_while_it_runs(demo_run):
    lines = [line for line in demo_run.stderr.splitlines() if line.startswith("round ")]
    assert len(lines) == ROUNDS * len(VARIANTS)
    assert lines[0].startswith(f"round 1/{ROUNDS}") and lines[-1].startswith(f"round {ROUNDS}/{ROUNDS}")
    for label in VARIANTS:
        assert sum(label in line for line in lines) == ROUNDS


def test_the_table_through_the_console_script():
    script = Path(sys.executable).parent / "prealloc"
    command = str(script) if script.exists() else shutil.which("prealloc")
    if command is None:
        pytest.skip("the prealloc console script is not installed")
    result = run_cli("demo", "--scale", "0.1", "--rounds", "1", "--quiet", executable=[command])
    assert result.returncode == 0, result.stderr
    assert "round 1/1" not in result.stderr  # --quiet
    out = result.stdout
    assert out.startswith("machine: ")
    for text in ("mlock:", "memory scale:", "usable: a full first pass", "preallocated", "reactive", "plain",
                 "needs served", "latency p50", "n=", "latency p99", "latency max", "need_hit_rate",
                 "resource_hit_rate", "waste_rate_by_type", "allocations by type", "failed needs",
                 "skipped low-confidence", "expired", "reactive / preallocated", "plain / preallocated",
                 "Over 1 interleaved round"):
        assert text in out, text
    assert "memory allocations locked" not in out  # only with --lock


def test_each_failure_reason_is_a_row_of_the_table(demo_json):
    data = copy.deepcopy(demo_json)
    data["variants"][REACTIVE]["failures"] = {"MEMORY: insufficient MEMORY": 3}
    data["variants"][REACTIVE]["needs_failed"] = 3
    data["variants"][PREALLOCATED]["allocation_failures"] = {"CPU: deadline passed": 2}
    out = io.StringIO()
    cli.format_table(data, out)
    rows = {line.split("   ")[0].strip(): line.split() for line in out.getvalue().splitlines()}
    assert rows["need: MEMORY: insufficient MEMORY"][-3:] == ["0", "3", "0"]
    assert rows["allocation: CPU: deadline passed"][-3:] == ["2", "0", "0"]


@pytest.mark.parametrize("args", [["demo", "--scale", "0.1", "--rounds", "1", "--json", "-v"],
                                  ["-v", "demo", "--scale", "0.1", "--rounds", "1", "--json"]])
def test_verbose_logs_to_stderr_and_leaves_stdout_json(args):
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)
    assert "INFO" in result.stderr and "replaying" in result.stderr


# ---------------------------------------------------------------------------------------
# the serving path, with the hit made certain


def test_a_need_whose_preallocation_is_ready_is_served_from_it_and_counted():
    trace = generate_trace(7, 0.25, memory_limit_mib=64, cores=1)
    event = next(e for e in trace.needs if trace.apps[e.app].cpu_percent == 0)
    app = trace.apps[event.app]
    # a long expiry: a busy machine may delay this thread, and the point is the hit
    translator = build_translator(trace.apps.values(), duration=120.0)
    with ResourcePreallocator(translator=translator, min_confidence=MIN_CONFIDENCE,
                              allocation_strategies=_strategies(False, False)) as pre:
        ids = pre.handle_prediction(Prediction(id="p", type="app_launch", predicted_value=app.name,
                                               confidence=0.9, expected_at=time.monotonic() + 120.0,
                                               target_application=app.name))
        assert ids and pre.wait_ready(ids, timeout=60)
        (rid,) = ids
        ready = pre.get_allocation(rid)
        assert ready.status.name == "ALLOCATED" and ready.allocated_amount >= event.need_mib
        outcome = _serve(pre, event, app)
        assert outcome.latency_ns is not None and outcome.error is None
        assert outcome.claims == outcome.claims_preallocated == 1
        stats = pre.get_statistics()
        assert stats.claimed == 1 and stats.released == 1
        assert stats.needs == 1 and stats.needs_preallocated == 1 and stats.need_hit_rate == 1.0
        assert stats.finished == stats.preallocations_finished == stats.used == 1
        assert stats.resource_hit_rate == 1.0
        assert len(pre) == 0


def test_a_need_without_a_preallocation_is_served_at_need_and_counted_as_a_miss():
    trace = generate_trace(7, 0.25, memory_limit_mib=64, cores=1)
    event = next(e for e in trace.needs if trace.apps[e.app].cpu_percent == 0)
    with ReactiveResourceAllocator(allocation_strategies=_strategies(False, False)) as reactive:
        outcome = _serve(reactive, event, trace.apps[event.app])
        assert outcome.latency_ns is not None and outcome.claims == 1 and outcome.claims_preallocated == 0
        stats = reactive.get_statistics()
        assert stats.needs == 1 and stats.needs_preallocated == 0 and stats.need_hit_rate == 0.0
        assert stats.finished == 1 and stats.preallocations_finished == 0  # made at need
        assert len(reactive) == 0


def test_the_first_pass_writes_every_byte_the_need_uses():
    buffer = bytearray(3 * 4096 + 17)
    _first_pass(buffer, 2 * 4096 + 5)
    written = np.frombuffer(buffer, dtype=np.uint8)
    assert (written[:2 * 4096 + 5] == WRITE_BYTE).all() and (written[2 * 4096 + 5:] == 0).all()


def test_the_plain_path_serves_a_need():
    event = generate_trace(7, 0.25, memory_limit_mib=16, cores=1).needs[0]
    outcome = _serve_plain(event, APPS[0])
    assert outcome.latency_ns is not None and outcome.latency_ns > 0 and outcome.claims == 0


def _result(label: str, latencies_ms: dict[str, list[float]]) -> VariantResult:
    result = VariantResult(label, label)
    result.add([_NeedOutcome(app, int(ms * 1e6)) for app, values in latencies_ms.items() for ms in values])
    return result


def test_the_conclusion_says_when_preallocation_loses_to_the_plain_path():
    trace = generate_trace(7, 1.0, memory_limit_mib=100, cores=1)
    small, large = sorted(trace.apps, key=lambda name: trace.apps[name].memory_mib)[::3]
    assert trace.apps[small].memory_mib * (1 + SIZER_MARGIN) <= 32
    machine = Machine(cores_usable=1, cores_online=1, memory_total_mib=4096, memory_available_mib=2048, thp="never")
    report = DemoReport(machine=machine, trace=trace, rounds=1, order=[list(VARIANTS)], lock=False,
                        memory_headroom=0.1, mlock_effective=False, mlock_detail="", rss_before_bytes=0,
                        rss_after_bytes=0, variants={
                            PREALLOCATED: _result(PREALLOCATED, {small: [0.5, 0.6], large: [0.5, 0.6]}),
                            REACTIVE: _result(REACTIVE, {small: [5.0, 6.0], large: [20.0, 30.0]}),
                            PLAIN: _result(PLAIN, {small: [0.2, 0.3], large: [10.0, 12.0]})})
    assert report.apps_where_plain_wins() == [small]
    text = report.conclusion()
    assert f"loses to the plain path for {small}" in text and "glibc" in text and large not in text.split(
        "loses to the plain path for")[1]
    assert "n=4 needs" in text and "on this machine overall" not in text
    assert "the p99 rests on the 2 largest samples" in text  # ranks floor(0.99 x 3) = 2 and 3 of 0..3
    report.variants[PLAIN] = _result(PLAIN, {small: [0.2, 0.3], large: [0.2, 0.3]})
    assert "loses to the plain path on this machine overall" in report.conclusion()


def test_rounds_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="rounds"):
            run_demo(rounds=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# arguments


@pytest.mark.parametrize("args, message", [
    (["demo", "--scale", "0"], "--scale"),
    (["demo", "--scale", "-1"], "--scale"),
    (["demo", "--scale", "nan"], "--scale"),
    (["demo", "--scale", "1000"], "--scale"),
    (["demo", "--scale", "abc"], "not a number"),
    (["demo", "--seed", "1.5"], "--seed"),
    (["demo", "--rounds", "0"], "--rounds"),
    (["demo", "--rounds", "2.5"], "--rounds"),
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
    for flag in ("--scale", "--seed", "--rounds", "--lock", "--json", "--quiet", "--verbose"):
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
