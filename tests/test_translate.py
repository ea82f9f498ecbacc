"""Rule translation (TOML / dict config, matching, emitted fields, validation) and the
adaptive sizer (convergence, bounded steps, outliers, decay, threads)."""
from __future__ import annotations

import math
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prealloc.translate import HOST_WARM_MIN_NEED, AdaptiveSizer, RuleTranslator, Translator
from prealloc.types import AllocationFeedback, Prediction, ResourceRequest, ResourceType

RULES_TOML = """
[[rule]]
name = "open-editor"
match = { type = "user_action", value = "open_*", target_application = "editor" }

[[rule.request]]
resource_type = "MEMORY"
need = 512
duration = 300.0
priority = 1.0

[[rule.request]]
resource_type = "cpu"
need = 50
duration = 10.0

[[rule]]
name = "dataset-load"
match = { type = "data_load", min_confidence = 0.5 }

[[rule.request]]
resource_type = "CACHE_SPACE"
need_from_value = true
scale = 1.5
"""


def editor_prediction(**overrides: Any) -> Prediction:
    fields: dict[str, Any] = dict(
        id="pred-1", type="user_action", predicted_value="open_file", confidence=0.8,
        expected_at=1234.5, target_application="editor", target_process_id=4242,
        source_predictor_id="bayes-1", properties={"user": "ada", "tags": ["x"]},
    )
    fields.update(overrides)
    return Prediction(**fields)


def one_rule(request: dict[str, Any] | None = None, **rule: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "r", "match": {"type": "t"},
                            "request": [request or {"resource_type": "MEMORY", "need": 10}]}
    base.update(rule)
    return {"rule": [base]}


# ---------------------------------------------------------------------------------------
# configuration


def test_toml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    translator = RuleTranslator.from_toml(path)

    assert [rule.name for rule in translator.rules] == ["open-editor", "dataset-load"]
    editor, dataset = translator.rules
    assert (editor.prediction_type, editor.value, editor.target_application) == ("user_action", "open_*", "editor")
    assert [(t.resource_type, t.need, t.duration, t.priority) for t in editor.requests] == [
        (ResourceType.MEMORY, 512.0, 300.0, 1.0), (ResourceType.CPU, 50.0, 10.0, 0.0)]
    assert dataset.min_confidence == 0.5
    assert dataset.requests[0].need_from_value and dataset.requests[0].scale == 1.5

    requests = translator.translate(editor_prediction())
    assert [(r.resource_type, r.predicted_need) for r in requests] == [
        (ResourceType.MEMORY, 512.0), (ResourceType.CPU, 50.0)]


def test_toml_syntax_error_is_a_value_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[rule]\nname = ")
    with pytest.raises(ValueError, match="broken.toml"):
        RuleTranslator.from_toml(path)


def test_dict_config_equals_the_toml_one(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    from_toml = RuleTranslator.from_toml(path)
    from_dict = RuleTranslator.from_dict({"rule": [
        {"name": "open-editor",
         "match": {"type": "user_action", "value": "open_*", "target_application": "editor"},
         "request": [{"resource_type": "MEMORY", "need": 512, "duration": 300.0, "priority": 1.0},
                     {"resource_type": "cpu", "need": 50, "duration": 10.0}]},
        {"name": "dataset-load", "match": {"type": "data_load", "min_confidence": 0.5},
         "request": [{"resource_type": "CACHE_SPACE", "need_from_value": True, "scale": 1.5}]},
    ]})
    assert from_dict.rules == from_toml.rules


REJECTED_CONFIGS: list[tuple[str, Any, list[str]]] = [
    ("unknown top-level key", {"rules": []}, ["rules"]),
    ("unknown rule key", one_rule(priority=3), ["'r'", "priority"]),
    ("unknown match key", one_rule(match={"type": "t", "app": "x"}), ["'r'", "app"]),
    ("unknown request key", one_rule({"resource_type": "MEMORY", "need": 1, "amount": 2}), ["'r'", "amount"]),
    ("unknown resource type", one_rule({"resource_type": "RAM", "need": 1}), ["'r'", "resource_type", "RAM"]),
    ("negative need", one_rule({"resource_type": "MEMORY", "need": -5}), ["'r'", "need", "-5"]),
    ("NaN need", one_rule({"resource_type": "MEMORY", "need": math.nan}), ["'r'", "need", "nan"]),
    ("infinite need", one_rule({"resource_type": "MEMORY", "need": math.inf}), ["'r'", "need", "inf"]),
    ("string need", one_rule({"resource_type": "MEMORY", "need": "512"}), ["'r'", "need", "str"]),
    ("need and need_from_value", one_rule({"resource_type": "MEMORY", "need": 1, "need_from_value": True}),
     ["'r'", "exactly one"]),
    ("neither need", one_rule({"resource_type": "MEMORY"}), ["'r'", "exactly one"]),
    ("scale without need_from_value", one_rule({"resource_type": "MEMORY", "need": 1, "scale": 2}),
     ["'r'", "scale"]),
    ("negative scale", one_rule({"resource_type": "MEMORY", "need_from_value": True, "scale": -1}),
     ["'r'", "scale"]),
    ("negative duration", one_rule({"resource_type": "MEMORY", "need": 1, "duration": -1}), ["'r'", "duration"]),
    ("NaN priority", one_rule({"resource_type": "MEMORY", "need": 1, "priority": math.nan}), ["'r'", "priority"]),
    ("rule without requests", one_rule(request=None) | {"rule": [{"name": "r", "match": {"type": "t"}}]},
     ["'r'", "at least one"]),
    ("empty request list", {"rule": [{"name": "r", "match": {"type": "t"}, "request": []}]},
     ["'r'", "at least one"]),
    ("two requests of one type", {"rule": [{"name": "r", "match": {"type": "t"}, "request": [
        {"resource_type": "MEMORY", "need": 1}, {"resource_type": "memory", "need": 2}]}]},
     ["'r'", "MEMORY"]),
    ("duplicate names", {"rule": [one_rule()["rule"][0], one_rule()["rule"][0]]}, ["'r'", "duplicate"]),
    ("missing name", {"rule": [{"match": {"type": "t"}, "request": [{"resource_type": "CPU", "need": 1}]}]},
     ["rule #0", "name"]),
    ("missing match type", one_rule(match={"value": "x"}), ["'r'", "match.type"]),
    ("min_confidence above 1", one_rule(match={"type": "t", "min_confidence": 1.5}), ["'r'", "min_confidence"]),
    ("value not a string", one_rule(match={"type": "t", "value": 3}), ["'r'", "match.value"]),
]


@pytest.mark.parametrize("config, expected", [(c, e) for _, c, e in REJECTED_CONFIGS],
                         ids=[name for name, _, _ in REJECTED_CONFIGS])
def test_bad_config_is_rejected_naming_rule_and_field(config: Any, expected: list[str]) -> None:
    with pytest.raises(ValueError) as raised:
        RuleTranslator.from_dict(config)
    message = str(raised.value)
    for fragment in expected:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------
# matching and emitted requests


def test_emitted_request_carries_every_field_of_template_and_prediction() -> None:
    translator = RuleTranslator.from_dict({"rule": [{
        "name": "open-editor", "match": {"type": "user_action", "value": "open_*"},
        "request": [{"resource_type": "MEMORY", "need": 512, "duration": 300.0, "priority": 2.5}]}]})
    prediction = editor_prediction()
    [request] = translator.translate(prediction)

    assert isinstance(request, ResourceRequest)
    assert request.resource_type is ResourceType.MEMORY
    assert request.predicted_need == 512.0
    assert request.confidence == 0.8
    assert request.priority == 2.5
    assert request.duration == 300.0
    assert request.deadline == 1234.5
    assert request.associated_prediction_id == "pred-1"
    metadata = request.metadata
    assert metadata.source_predictor_id == "bayes-1"
    assert metadata.triggering_pattern_id == "open-editor"
    assert metadata.target_application == "editor"
    assert metadata.target_process_id == 4242
    assert metadata.custom_properties == {"user": "ada", "tags": ["x"]}
    # a copy: changing the request's properties leaves the prediction's alone
    metadata.custom_properties["user"] = "bob"
    assert prediction.properties["user"] == "ada"
    assert request.request_id > 0


def test_value_and_application_match_exactly_or_by_glob() -> None:
    translator = RuleTranslator.from_dict({"rule": [
        {"name": "glob", "match": {"type": "user_action", "value": "open_*", "target_application": "code*"},
         "request": [{"resource_type": "MEMORY", "need": 1}]},
        {"name": "exact", "match": {"type": "user_action", "value": "save[1]"},
         "request": [{"resource_type": "CPU", "need": 1}]},
    ]})

    def names(**overrides: Any) -> list[str | None]:
        return [r.metadata.triggering_pattern_id for r in translator.translate(editor_prediction(**overrides))]

    assert names(predicted_value="open_project", target_application="code-insiders") == ["glob"]
    assert names(predicted_value="open_project", target_application="vim") == []
    assert names(predicted_value="close_project", target_application="code") == []
    assert names(predicted_value="open_project", target_application=None) == []
    assert names(predicted_value="OPEN_project", target_application="code") == []  # case-sensitive
    assert names(predicted_value="save[1]") == ["exact"]  # literal text with glob characters
    assert names(type="system_event", predicted_value="open_x", target_application="code") == []


def test_value_is_matched_as_text_of_a_non_string_prediction_value() -> None:
    translator = RuleTranslator.from_dict(one_rule(match={"type": "t", "value": "4*"}))
    assert len(translator.translate(editor_prediction(type="t", predicted_value=42))) == 1
    assert translator.translate(editor_prediction(type="t", predicted_value=52)) == []


def test_every_matching_rule_emits_in_rule_order() -> None:
    translator = RuleTranslator.from_dict({"rule": [
        {"name": "broad", "match": {"type": "user_action"}, "request": [{"resource_type": "CPU", "need": 5}]},
        {"name": "narrow", "match": {"type": "user_action", "value": "open_file"},
         "request": [{"resource_type": "MEMORY", "need": 64}, {"resource_type": "DISK_IO", "need": 8}]},
        {"name": "other", "match": {"type": "data_load"}, "request": [{"resource_type": "CPU", "need": 1}]},
    ]})
    requests = translator.translate(editor_prediction())
    assert [(r.metadata.triggering_pattern_id, r.resource_type) for r in requests] == [
        ("broad", ResourceType.CPU), ("narrow", ResourceType.MEMORY), ("narrow", ResourceType.DISK_IO)]
    assert len({r.request_id for r in requests}) == 3


def test_min_confidence_filters_per_rule() -> None:
    translator = RuleTranslator.from_dict(one_rule(match={"type": "t", "min_confidence": 0.6}))
    assert translator.translate(editor_prediction(type="t", confidence=0.59)) == []
    assert len(translator.translate(editor_prediction(type="t", confidence=0.6))) == 1


def test_prediction_matching_nothing_gives_empty_list() -> None:
    translator = RuleTranslator.from_dict(one_rule())
    assert translator.translate(editor_prediction(type="nothing_like_it")) == []
    assert RuleTranslator([]).translate(editor_prediction()) == []


def test_need_from_value_scales_the_predicted_value() -> None:
    translator = RuleTranslator.from_dict(
        one_rule({"resource_type": "CACHE_SPACE", "need_from_value": True, "scale": 1.5}))
    [request] = translator.translate(editor_prediction(type="t", predicted_value=200))
    assert request.predicted_need == 300.0
    [request] = translator.translate(editor_prediction(type="t", predicted_value="80.5"))
    assert request.predicted_need == pytest.approx(120.75)
    unscaled = RuleTranslator.from_dict(one_rule({"resource_type": "MEMORY", "need_from_value": True}))
    assert unscaled.translate(editor_prediction(type="t", predicted_value=7))[0].predicted_need == 7.0


@pytest.mark.parametrize("value", ["lots", None, True, -3, float("inf")])
def test_need_from_value_refuses_values_that_are_not_amounts(value: Any) -> None:
    translator = RuleTranslator.from_dict(one_rule({"resource_type": "MEMORY", "need_from_value": True}))
    prediction = editor_prediction(type="t")
    prediction.predicted_value = value  # bypasses nothing: translate validates
    with pytest.raises(ValueError, match="'r'|predicted_value"):
        translator.translate(prediction)


def test_invalid_prediction_is_refused() -> None:
    translator = RuleTranslator.from_dict(one_rule())
    with pytest.raises(ValueError, match="confidence"):
        translator.translate(editor_prediction(type="t", confidence=1.5))
    with pytest.raises(ValueError, match="target_process_id"):
        translator.translate(editor_prediction(type="t", target_process_id=-1))


def test_rule_translator_is_a_translator() -> None:
    assert isinstance(RuleTranslator([]), Translator)


# ---------------------------------------------------------------------------------------
# translator + sizer


def test_sizer_resizes_adaptive_requests_from_feedback() -> None:
    sizer = AdaptiveSizer(min_samples=3, max_step=10.0)
    translator = RuleTranslator.from_dict({"rule": [{
        "name": "open-editor", "match": {"type": "user_action"},
        "request": [{"resource_type": "MEMORY", "need": 512},
                    {"resource_type": "CPU", "need": 50, "adaptive": False}]}]}, sizer=sizer)

    memory, cpu = translator.translate(editor_prediction())
    assert (memory.predicted_need, cpu.predicted_need) == (512.0, 50.0)  # nothing learnt yet
    for _ in range(3):
        assert translator.observe_feedback(memory, AllocationFeedback(True, actual_amount_used=200.0))
        assert not translator.observe_feedback(cpu, AllocationFeedback(True, actual_amount_used=10.0))
    assert not translator.observe_feedback(memory, AllocationFeedback(False))  # no amount: nothing to learn

    memory, cpu = translator.translate(editor_prediction())
    assert memory.predicted_need == pytest.approx(220.0)  # 200 x (1 + margin 0.1)
    assert cpu.predicted_need == 50.0
    assert sizer.snapshot() == {("open-editor", ResourceType.MEMORY): pytest.approx(220.0)}


# ---------------------------------------------------------------------------------------
# what the host serves warm is left to it


def test_min_need_leaves_small_needs_to_the_host_and_keeps_the_rest() -> None:
    assert HOST_WARM_MIN_NEED == {ResourceType.MEMORY: 32.0}  # glibc's mmap threshold ceiling, 64-bit
    config = {"rule": [
        {"name": "small", "match": {"type": "t"},
         "request": [{"resource_type": "MEMORY", "need": 24}, {"resource_type": "CPU", "need": 50}]},
        {"name": "large", "match": {"type": "t"}, "request": [{"resource_type": "MEMORY", "need": 32}]}]}
    prediction = editor_prediction(type="t")
    plain = RuleTranslator.from_dict(config)
    assert plain.min_need == {}  # by default a rule asks for what it says
    assert [(r.metadata.triggering_pattern_id, r.resource_type) for r in plain.translate(prediction)] == [
        ("small", ResourceType.MEMORY), ("small", ResourceType.CPU), ("large", ResourceType.MEMORY)]
    warm = RuleTranslator.from_dict(config, min_need=HOST_WARM_MIN_NEED)
    assert warm.min_need == {ResourceType.MEMORY: 32.0}
    assert [(r.metadata.triggering_pattern_id, r.resource_type, r.predicted_need)
            for r in warm.translate(prediction)] == [
        ("small", ResourceType.CPU, 50.0), ("large", ResourceType.MEMORY, 32.0)]  # the floor itself is kept
    by_name = RuleTranslator.from_dict(config, min_need={"cpu": 60})
    assert [r.resource_type for r in by_name.translate(prediction)] == [ResourceType.MEMORY, ResourceType.MEMORY]


def test_min_need_applies_to_the_learned_size() -> None:
    sizer = AdaptiveSizer(min_samples=3, max_step=100.0)
    translator = RuleTranslator.from_dict(one_rule({"resource_type": "MEMORY", "need": 64}), sizer=sizer,
                                          min_need=HOST_WARM_MIN_NEED)
    (request,) = translator.translate(editor_prediction(type="t"))
    for _ in range(3):  # the real use is small: the host serves it warm
        translator.observe_feedback(request, AllocationFeedback(True, actual_amount_used=10.0))
    assert translator.translate(editor_prediction(type="t")) == []
    for _ in range(30):  # it grows past the floor again: preallocated again
        sizer.observe(("r", ResourceType.MEMORY), 100.0)
    (request,) = translator.translate(editor_prediction(type="t"))
    assert request.predicted_need >= 32.0


@pytest.mark.parametrize("min_need, error, words", [
    ({"MEMORY": -1}, ValueError, ["min_need", "MEMORY"]),
    ({"MEMORY": math.nan}, ValueError, ["min_need", "MEMORY"]),
    ({"MEMORY": True}, ValueError, ["min_need", "MEMORY"]),
    ({"BOGUS": 1}, ValueError, ["min_need", "BOGUS"]),
    ({3: 1}, TypeError, ["min_need", "3"]),
    ([("MEMORY", 32)], TypeError, ["min_need", "mapping"]),
])
def test_bad_min_need_is_refused_naming_it(min_need: Any, error: type, words: list[str]) -> None:
    with pytest.raises(error) as info:
        RuleTranslator.from_dict(one_rule(), min_need=min_need)
    for word in words:
        assert word in str(info.value)


def test_translation_that_fails_leaves_no_anchor_in_the_sizer() -> None:
    sizer = AdaptiveSizer()
    translator = RuleTranslator.from_dict({"rule": [
        {"name": "a", "match": {"type": "t"}, "request": [{"resource_type": "MEMORY", "need": 5}]},
        {"name": "b", "match": {"type": "t"}, "request": [{"resource_type": "CPU", "need_from_value": True}]},
    ]}, sizer=sizer)
    with pytest.raises(ValueError):
        translator.translate(editor_prediction(type="t", predicted_value="not a number"))
    # the first rule's key was never sized, so its first learned size is its target
    for _ in range(3):
        sizer.observe(("a", ResourceType.MEMORY), 1000.0)
    assert sizer.snapshot()[("a", ResourceType.MEMORY)] == pytest.approx(1100.0)


# ---------------------------------------------------------------------------------------
# adaptive sizer

KEY = ("rule", ResourceType.MEMORY)


def sizes_after_each(sizer: AdaptiveSizer, template: float, observations: list[float]) -> list[float]:
    sizer.size(KEY, template)
    out = []
    for value in observations:
        sizer.observe(KEY, value)
        out.append(sizer.size(KEY, template))
    return out


def test_template_need_is_used_until_min_samples() -> None:
    sizer = AdaptiveSizer(min_samples=3)
    assert sizes_after_each(sizer, 512.0, [100.0, 100.0]) == [512.0, 512.0]
    assert sizer.snapshot() == {}
    sizer.observe(KEY, 100.0)
    assert sizer.size(KEY, 512.0) < 512.0


def test_converges_to_the_high_quantile_in_bounded_steps() -> None:
    sizer = AdaptiveSizer(quantile=0.9, margin=0.1, max_step=0.5, min_samples=3)
    sizes = sizes_after_each(sizer, 1000.0, [100.0] * 12)
    # 1000 -> 110 is a factor of 9.1: ceil(log(9.1) / log(1.5)) = 6 steps after min_samples
    steps_needed = math.ceil(math.log(1000.0 / 110.0) / math.log(1.5))
    assert sizes[2 + steps_needed - 1] == pytest.approx(110.0)
    assert sizes[2 + steps_needed - 2] > 110.0 * 1.0001
    assert sizes[-1] == pytest.approx(110.0)


def test_quantile_sits_between_the_body_and_the_tail() -> None:
    # 10 % of uses are 500, the rest 100: the 0.9 quantile lands on the boundary of
    # the tail, the 0.5 quantile on the body
    pattern = [100.0] * 9 + [500.0]
    high = AdaptiveSizer(quantile=0.99, decay=1.0, max_step=100.0, margin=0.0)
    median = AdaptiveSizer(quantile=0.5, decay=1.0, max_step=100.0, margin=0.0)
    high_sizes = sizes_after_each(high, 1.0, pattern * 6)
    median_sizes = sizes_after_each(median, 1.0, pattern * 6)
    assert high_sizes[-1] == 500.0
    assert median_sizes[-1] == 100.0


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=1, max_size=80),
       quantile=st.floats(min_value=0.05, max_value=1.0), decay=st.floats(min_value=0.5, max_value=1.0))
def test_unclipped_size_is_the_weighted_quantile_by_definition(values: list[float], quantile: float,
                                                               decay: float) -> None:
    sizer = AdaptiveSizer(quantile=quantile, decay=decay, margin=0.0, min_samples=1, max_step=1e30,
                          floor=1e-9, window=64)
    for value in values:
        sizer.observe(KEY, value)
    size = sizer.snapshot()[KEY]
    window = values[-64:]
    weights = [decay ** (len(window) - 1 - i) for i in range(len(window))]
    total = sum(weights)
    at_or_below = sum(w for v, w in zip(window, weights) if v <= size)
    below = sum(w for v, w in zip(window, weights) if v < size)
    if size > 1e-9:  # the floor did not decide it
        assert size in window
        assert at_or_below >= quantile * total * (1 - 1e-9)
        assert below < quantile * total


def test_each_update_moves_the_size_by_at_most_max_step() -> None:
    sizer = AdaptiveSizer(max_step=0.5)
    sizes = sizes_after_each(sizer, 100.0, [1e9] * 10)
    previous = 100.0
    for size in sizes:
        assert size <= previous * 1.5 * (1 + 1e-12)
        previous = size
    assert sizes[-1] > 100.0  # it did grow, just not at once


def test_one_huge_outlier_stays_bounded_and_the_size_comes_back() -> None:
    # a full, steady window: the outlier sets the quantile for one sample only
    sizer = AdaptiveSizer()
    sizes = sizes_after_each(sizer, 110.0, [100.0] * 64 + [1e12] + [100.0] * 20)
    assert sizes[63] == pytest.approx(110.0)
    assert max(sizes) <= 110.0 * 1.5 * (1 + 1e-12)
    assert sizes[-1] == pytest.approx(110.0)

    # a young window is the worst case: still a bound independent of the outlier's size
    worst = 0.0
    for steady in range(1, 40):
        sizer = AdaptiveSizer()
        sizes = sizes_after_each(sizer, 100.0, [100.0] * steady + [1e12] + [100.0] * 40)
        worst = max(worst, max(sizes))
        assert sizes[-1] == pytest.approx(110.0)
    assert worst <= 110.0 * 1.5 ** 7


def test_decay_forgets_the_old_regime() -> None:
    regime_change = [1000.0] * 64 + [100.0] * 40
    decayed = sizes_after_each(AdaptiveSizer(decay=0.9), 1000.0, regime_change)
    undecayed = sizes_after_each(AdaptiveSizer(decay=1.0), 1000.0, regime_change)
    assert decayed[63] == pytest.approx(1100.0)
    # 22 samples for the new regime to carry 90 % of the weight, 6 bounded steps down
    assert decayed[64 + 22 + 6] == pytest.approx(110.0)
    assert decayed[-1] == pytest.approx(110.0)
    # without decay the 24 old samples left in the window still hold the 0.9 quantile
    assert undecayed[-1] == pytest.approx(1100.0)


def test_rising_use_is_followed_quickly() -> None:
    sizes = sizes_after_each(AdaptiveSizer(), 110.0, [100.0] * 64 + [400.0] * 6)
    assert sizes[64 + 1] > sizes[63]  # grows from the second sample of the new regime
    assert sizes[-1] == pytest.approx(440.0)


def test_floor_and_ceiling_bound_learned_sizes() -> None:
    sizer = AdaptiveSizer(floor=50.0, ceiling=200.0, max_step=100.0, min_samples=1)
    sizer.observe(KEY, 1.0)
    assert sizer.snapshot()[KEY] == 50.0
    sizer.observe(KEY, 1e6)
    assert sizer.snapshot()[KEY] == 200.0


def test_keys_are_learnt_independently() -> None:
    sizer = AdaptiveSizer(min_samples=1, max_step=100.0, margin=0.0)
    sizer.observe(("a", ResourceType.MEMORY), 10.0)
    sizer.observe(("a", ResourceType.CPU), 300.0)
    assert sizer.snapshot() == {("a", ResourceType.MEMORY): 10.0, ("a", ResourceType.CPU): 300.0}
    assert sizer.size(("b", ResourceType.MEMORY), 7.0) == 7.0


def test_concurrent_observers_leave_a_sane_snapshot() -> None:
    sizer = AdaptiveSizer()
    keys = [(f"rule-{i}", ResourceType.MEMORY) for i in range(4)]
    for key in keys:
        sizer.size(key, 100.0)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def observe(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for _ in range(2000):
                key = keys[rng.randrange(len(keys))]
                sizer.observe(key, rng.uniform(90.0, 110.0))
                sizer.size(key, 100.0)
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=observe, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    snapshot = sizer.snapshot()
    assert set(snapshot) == set(keys)
    assert sum(sizer.observation_count(key) for key in keys) == 8 * 2000
    for size in snapshot.values():
        # the quantile of values in [90, 110] times 1.1
        assert 90.0 * 1.1 <= size <= 110.0 * 1.1


@settings(max_examples=300, deadline=None)
@given(observations=st.lists(st.floats(min_value=0.0, max_value=1e12), min_size=1, max_size=120),
       template=st.floats(min_value=0.001, max_value=1e9),
       max_step=st.floats(min_value=0.01, max_value=4.0),
       decay=st.floats(min_value=0.3, max_value=1.0),
       quantile=st.floats(min_value=0.1, max_value=1.0))
def test_every_size_change_is_within_the_step_bound(observations: list[float], template: float,
                                                    max_step: float, decay: float, quantile: float) -> None:
    sizer = AdaptiveSizer(max_step=max_step, decay=decay, quantile=quantile)
    sizes = [sizer.size(KEY, template)] + sizes_after_each(sizer, template, observations)
    for old, new in zip(sizes, sizes[1:]):
        ratio = new / old
        assert 1 / (1 + max_step) * (1 - 1e-9) <= ratio <= (1 + max_step) * (1 + 1e-9), (old, new)


@pytest.mark.parametrize("kwargs, field", [
    ({"quantile": 0.0}, "quantile"), ({"quantile": 1.5}, "quantile"), ({"decay": 0.0}, "decay"),
    ({"decay": 1.1}, "decay"), ({"window": 0}, "window"), ({"min_samples": 0}, "min_samples"),
    ({"min_samples": 65}, "min_samples"), ({"max_step": 0.0}, "max_step"), ({"max_step": math.inf}, "max_step"),
    ({"margin": -0.1}, "margin"), ({"floor": 0.0}, "floor"), ({"floor": 10.0, "ceiling": 5.0}, "ceiling"),
    ({"quantile": math.nan}, "quantile"),
])
def test_bad_sizer_parameters_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdaptiveSizer(**kwargs)


@pytest.mark.parametrize("amount", [-1.0, math.nan, math.inf])
def test_bad_observation_is_refused_and_changes_nothing(amount: float) -> None:
    sizer = AdaptiveSizer(min_samples=1)
    with pytest.raises(ValueError, match="actual_amount_used"):
        sizer.observe(KEY, amount)
    assert sizer.observation_count(KEY) == 0
    assert sizer.snapshot() == {}


def test_a_rules_file_nested_too_deeply_or_empty_is_refused(tmp_path):
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match="deep|TOML"):
        RuleTranslator.from_toml(deep)
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match="no rules"):
        RuleTranslator.from_toml(empty)


def test_a_request_template_carries_the_strategys_options():
    translator = RuleTranslator.from_dict({"rule": [{
        "name": "warm", "match": {"type": "t"},
        "request": [{"resource_type": "CACHE_SPACE", "need": 64,
                     "properties": {"files": ["/usr/lib/*.so"], "max_mib": 64}}]}]})
    (request,) = translator.translate(Prediction("p", "t", "v", 0.9, properties={"max_mib": 32}))
    assert request.metadata.custom_properties == {"files": ["/usr/lib/*.so"], "max_mib": 32}
    with pytest.raises(ValueError, match="properties"):
        RuleTranslator.from_dict({"rule": [{"name": "bad", "match": {"type": "t"},
                                            "request": [{"resource_type": "CACHE_SPACE", "need": 1,
                                                         "properties": [1, 2]}]}]})
