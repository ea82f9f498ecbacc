"""Translators turn a Prediction into ResourceRequests; the adaptive sizer learns sizes.

A translator is anything with ``translate(prediction) -> list[ResourceRequest]``
(:class:`Translator`). :class:`RuleTranslator` is the one the library ships: a list of
rules, each matching predictions by type, value and target application, each emitting
one or more request templates. The spec hard-codes one such rule
(``open_photoshop`` -> 2 GiB + a CPU burst); here rules are data, loaded from TOML or a
dict, and checked when they are loaded rather than when a prediction first hits them.

Rule file schema (TOML)::

    [[rule]]
    name = "open-editor"        # unique; becomes metadata.triggering_pattern_id
    match = { type = "user_action", value = "open_*", target_application = "editor" }

    [[rule.request]]
    resource_type = "MEMORY"    # a ResourceType name, any case
    need = 512                  # in the type's unit (see prealloc.types)
    duration = 300.0            # seconds, optional (None = until released)
    priority = 1.0              # optional, default 0.0

    [[rule.request]]
    resource_type = "CPU"
    need_from_value = true      # need = float(prediction.predicted_value) * scale
    scale = 1.5                 # optional with need_from_value, default 1.0
    adaptive = false            # optional, default true: let the sizer resize this one

    [[rule.request]]
    resource_type = "CACHE_SPACE"
    need = 256
    properties = { files = ["/usr/lib/python3/**/*.so"], max_mib = 256 }  # optional: the
                                # strategy's options (files, profile, directory, mode, ...)

``match`` keys:

- ``type`` (required): equal to ``prediction.type``.
- ``value`` (optional): equal to ``str(prediction.predicted_value)`` or an
  :func:`fnmatch.fnmatchcase` glob of it (``open_*``); case-sensitive everywhere.
- ``target_application`` (optional): equal to, or a glob of,
  ``prediction.target_application``; a prediction without one does not match.
- ``min_confidence`` (optional): the rule ignores predictions less confident.

Each request needs exactly one of ``need`` and ``need_from_value = true``. Unknown
keys, an unknown resource type, a negative / NaN / infinite amount, a duplicate rule
name, a rule without a request and two requests of one resource type in one rule (the
sizer learns per rule and type, so they would share what it learns) are refused at
load with a ``ValueError`` naming the rule and the field.

Every rule that matches emits its requests, in rule order and, within a rule, in
request order: overlapping rules add up rather than shadow each other, so a broad
rule ("any user_action: a little CPU") composes with a narrow one.

What the host already serves warm is better left to it: glibc's malloc keeps a freed
block below its mmap threshold (which rises to the size of any mmap'ed block freed, up
to 32 MiB on 64-bit) and hands it, faulted in, to the next malloc of that size, so
``np.empty`` + a first pass over a reused 12-24 MiB block is faster than a preallocation
hit (``prealloc demo`` measures it). ``RuleTranslator(..., min_need=HOST_WARM_MIN_NEED)``
emits no MEMORY request below that floor; any per-type floor can be given. The
translator's default is no floor, so a rule asks for what it says.

Each emitted request: ``predicted_need`` from the template, or from the
:class:`AdaptiveSizer` when the translator has one (key ``(rule name, resource
type)``); ``confidence`` of the prediction; ``priority`` and ``duration`` of the
template; ``deadline = prediction.expected_at``; metadata with the prediction's
``source_predictor_id``, ``target_application`` and ``target_process_id``,
``triggering_pattern_id = rule name`` and ``custom_properties``: the template's
``properties`` overlaid with a copy of ``prediction.properties`` (the prediction's win);
``associated_prediction_id = prediction.id``.
"""
from __future__ import annotations

import bisect
import fnmatch
import logging
import math
import sys
import threading
from collections import deque
from dataclasses import dataclass
from os import PathLike
from typing import Any, Hashable, Mapping, Protocol, Sequence, runtime_checkable

from .types import (
    AllocationFeedback,
    Prediction,
    RequestMetadata,
    ResourceRequest,
    ResourceType,
    check_amount,
    check_confidence,
)

log = logging.getLogger(__name__)

# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, in MiB: below it a freed block is reused
# warm by malloc (see the module docstring)
HOST_WARM_MEMORY_MIB = 32.0
HOST_WARM_MIN_NEED: Mapping[ResourceType, float] = {ResourceType.MEMORY: HOST_WARM_MEMORY_MIB}


@runtime_checkable
class Translator(Protocol):
    """Turns one prediction into the requests it calls for ([] when none)."""

    def translate(self, prediction: Prediction) -> list[ResourceRequest]: ...


# ---------------------------------------------------------------------------------------
# Adaptive sizer


@dataclass(slots=True)
class _SizerState:
    # (value, sequence number): the weight of a sample is decay ** (latest - seq), so a
    # new sample ages every older one without rewriting the window.
    samples: deque[tuple[float, int]]
    observed: int = 0
    anchor: float | None = None  # the last template need handed out before learning
    current: float | None = None  # the learned size, once min_samples are in


class AdaptiveSizer:
    """Learns how much of a resource a rule's requests really use, and sizes them so.

    Per key (the translator uses ``(rule name, ResourceType)``), feedback
    ``observe(key, actual_amount_used)`` feeds a window of the last ``window`` samples.
    Each sample carries weight ``decay ** age`` (age 0 for the newest), so the past
    fades geometrically and a regime change is forgotten in about
    ``log(1 - quantile) / log(decay)`` samples (22 with the defaults) when use drops,
    and within two samples when it rises: preallocating too little costs more than
    too much, and the quantile is what makes that asymmetry.

    The target is the weighted ``quantile`` of the window (the smallest sample whose
    cumulative weight, in ascending order, reaches ``quantile`` of the total), times
    ``1 + margin``, clamped into ``[floor, ceiling]``.

    The size handed out moves towards the target, but each observation may change it
    by at most the factor ``1 + max_step`` either way: the new size lies within
    ``[old / (1 + max_step), old * (1 + max_step)]``. One absurd sample (a leak, a
    mis-measured release) therefore grows a size by at most ``1 + max_step`` per
    sample it dominates the quantile, and a high quantile of a decayed window lets
    it dominate only briefly: it sets the quantile only while its weight exceeds
    ``1 - quantile`` of the total, which with the defaults is for at most 7 samples
    in a young window (a bound of 1.5**7, about 17x, whatever the outlier's size)
    and for one sample in a full one. Sizes follow real use without runaway growth.

    Until ``min_samples`` observations of a key exist, ``size`` returns the template
    need it is given. The first learned size starts from the last template need seen
    for the key (clamped into ``[floor, ceiling]``), so the switch from template to
    learned sizes is itself one bounded step; a key that was never sized starts at its
    target. ``floor`` defaults to 0.001 units rather than 0 because a multiplicative
    step bound could never leave a size of zero.

    Thread-safe: one lock guards every key; observe and size are O(window).
    """

    def __init__(
        self,
        *,
        quantile: float = 0.9,
        decay: float = 0.9,
        window: int = 64,
        margin: float = 0.1,
        min_samples: int = 3,
        max_step: float = 0.5,
        floor: float = 0.001,
        ceiling: float | None = None,
    ) -> None:
        if not _is_number(quantile) or not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], not {quantile!r}")
        if not _is_number(decay) or not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], not {decay!r}")
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be an int >= 1, not {window!r}")
        if not _is_int(min_samples) or not 1 <= min_samples <= window:
            raise ValueError(f"min_samples must be an int in [1, window={window}], not {min_samples!r}")
        if not _is_number(max_step) or not 0.0 < max_step < math.inf:
            raise ValueError(f"max_step must be finite and > 0, not {max_step!r}")
        margin = check_amount("margin", margin)
        floor = check_amount("floor", floor)
        if floor <= 0.0:
            raise ValueError("floor must be > 0: a multiplicative step bound cannot leave a size of 0")
        if ceiling is not None:
            ceiling = check_amount("ceiling", ceiling)
            if ceiling < floor:
                raise ValueError(f"ceiling ({ceiling}) must be >= floor ({floor})")
        self.quantile = float(quantile)
        self.decay = float(decay)
        self.window = window
        self.margin = margin
        self.min_samples = min_samples
        self.max_step = float(max_step)
        self.floor = floor
        self.ceiling = ceiling
        self._lock = threading.Lock()
        self._states: dict[Hashable, _SizerState] = {}

    def observe(self, key: Hashable, actual_amount_used: float) -> None:
        """Adds one observation of real use for key; ValueError for a bad amount."""
        amount = check_amount("actual_amount_used", actual_amount_used)
        with self._lock:
            state = self._state_for(key)
            state.observed += 1
            state.samples.append((amount, state.observed))
            if state.observed < self.min_samples:
                return
            target = self._clamp(self._weighted_quantile(state) * (1.0 + self.margin))
            if state.current is None:
                if state.anchor is None:
                    # never handed out: there is no previous size to step from
                    state.current = target
                    return
                state.current = self._clamp(state.anchor)
            state.current = self._step_towards(state.current, target)

    def _state_for(self, key: Hashable) -> _SizerState:
        """key's state, made on first use; the caller holds self._lock."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _SizerState(samples=deque(maxlen=self.window))
        return state

    def size(self, key: Hashable, template_need: float) -> float:
        """The size to request for key: learned once min_samples are in, else template_need."""
        template_need = check_amount("template_need", template_need)
        with self._lock:
            state = self._state_for(key)
            if state.current is None:
                state.anchor = template_need
                return template_need
            return state.current

    def snapshot(self) -> dict[Hashable, float]:
        """{key: learned size} for every key that has one."""
        with self._lock:
            return {key: s.current for key, s in self._states.items() if s.current is not None}

    def observation_count(self, key: Hashable) -> int:
        with self._lock:
            state = self._states.get(key)
            return 0 if state is None else state.observed

    def _clamp(self, value: float) -> float:
        value = max(value, self.floor)
        return value if self.ceiling is None else min(value, self.ceiling)

    def _step_towards(self, old: float, target: float) -> float:
        factor = 1.0 + self.max_step
        return min(max(target, old / factor), old * factor)

    def _weighted_quantile(self, state: _SizerState) -> float:
        latest = state.observed
        weighted = sorted((value, self.decay ** (latest - seq)) for value, seq in state.samples)
        cumulative: list[float] = []
        running = 0.0
        for _, weight in weighted:
            running += weight
            cumulative.append(running)
        # the first sample whose cumulative weight reaches the quantile; the min() guards
        # float round-off in the last partial sum
        index = bisect.bisect_left(cumulative, self.quantile * running * (1.0 - 1e-12))
        return weighted[min(index, len(weighted) - 1)][0]


# ---------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """One request a rule emits. Exactly one of need / need_from_value is in use."""

    resource_type: ResourceType
    need: float | None = None
    need_from_value: bool = False
    scale: float = 1.0
    duration: float | None = None
    priority: float = 0.0
    adaptive: bool = True
    properties: tuple[tuple[str, Any], ...] = ()  # the strategy's options, as custom_properties


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches predictions (see the module docstring) and emits its request templates."""

    name: str
    prediction_type: str
    requests: tuple[RequestTemplate, ...]
    value: str | None = None
    target_application: str | None = None
    min_confidence: float | None = None

    def matches(self, prediction: Prediction) -> bool:
        if prediction.type != self.prediction_type:
            return False
        if self.min_confidence is not None and prediction.confidence < self.min_confidence:
            return False
        if self.value is not None and not _exact_or_glob(str(prediction.predicted_value), self.value):
            return False
        if self.target_application is not None:
            application = prediction.target_application
            if application is None or not _exact_or_glob(application, self.target_application):
                return False
        return True


_TOP_KEYS = frozenset({"rule"})
_RULE_KEYS = frozenset({"name", "match", "request"})
_MATCH_KEYS = frozenset({"type", "value", "target_application", "min_confidence"})
_REQUEST_KEYS = frozenset(
    {"resource_type", "need", "need_from_value", "scale", "duration", "priority", "adaptive", "properties"})


class RuleTranslator:
    """A :class:`Translator` driven by rules; see the module docstring for the schema."""

    def __init__(self, rules: Sequence[Rule], *, sizer: AdaptiveSizer | None = None,
                 min_need: Mapping[ResourceType | str, float] | None = None) -> None:
        """``min_need``: per resource type, the least need worth preallocating; a request
        whose need (after the sizer) is below its type's floor is not emitted.
        HOST_WARM_MIN_NEED leaves to malloc the memory it serves warm."""
        floors = _parse_min_need(min_need)
        seen: set[str] = set()
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules must be Rule objects, not {type(rule).__name__}")
            if rule.name in seen:
                raise ValueError(f"rule {rule.name!r}: duplicate rule name")
            seen.add(rule.name)
            if not rule.requests:
                raise ValueError(f"rule {rule.name!r}: a rule needs at least one request")
        self._rules = tuple(rules)
        self._sizer = sizer
        self._min_need = floors

    @classmethod
    def from_toml(cls, path: str | PathLike[str], *, sizer: AdaptiveSizer | None = None,
                  min_need: Mapping[ResourceType | str, float] | None = None) -> RuleTranslator:
        """Rules from a TOML file (schema in the module docstring)."""
        toml = _toml_module()
        with open(path, "rb") as rule_file:
            try:
                document = toml.load(rule_file)
            except toml.TOMLDecodeError as error:
                raise ValueError(f"{path}: not valid TOML: {error}") from error
            except RecursionError:  # the parser recurses per nesting level
                raise ValueError(f"{path}: nested too deeply to be a rules file") from None
        if not document.get("rule"):
            raise ValueError(f"{path}: no rules ([[rule]] tables); a rules file must have at least one")
        return cls.from_dict(document, sizer=sizer, min_need=min_need)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], *, sizer: AdaptiveSizer | None = None,
                  min_need: Mapping[ResourceType | str, float] | None = None) -> RuleTranslator:
        """Rules from a mapping shaped like the TOML file: ``{"rule": [{...}, ...]}``."""
        if not isinstance(mapping, Mapping):
            raise ValueError(f"rule configuration must be a mapping, not {type(mapping).__name__}")
        unknown = set(mapping) - _TOP_KEYS
        if unknown:
            raise ValueError(f"unknown top-level keys {sorted(unknown)}; expected only 'rule'")
        raw_rules = mapping.get("rule", [])
        if not isinstance(raw_rules, list):
            raise ValueError("'rule' must be an array of tables ([[rule]])")
        return cls([_parse_rule(raw, index) for index, raw in enumerate(raw_rules)], sizer=sizer,
                   min_need=min_need)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    @property
    def min_need(self) -> Mapping[ResourceType, float]:
        """The per-type floors (a copy): needs below them are not emitted."""
        return dict(self._min_need)

    @property
    def sizer(self) -> AdaptiveSizer | None:
        return self._sizer

    def translate(self, prediction: Prediction) -> list[ResourceRequest]:
        """The requests of every matching rule, in rule order; [] if none matches.

        A prediction that fails validation, or whose value a ``need_from_value`` rule
        cannot read as a number, raises ValueError and emits nothing."""
        prediction.validate()
        drafts: list[tuple[Rule, RequestTemplate, float]] = []
        for rule in self._rules:
            if not rule.matches(prediction):
                continue
            for template in rule.requests:
                drafts.append((rule, template, _template_need(rule, template, prediction)))
        # needs are all computed before the sizer is consulted, so a prediction that
        # fails halfway leaves no anchor behind in the sizer
        requests = [self._build_request(rule, template, need, prediction) for rule, template, need in drafts]
        if self._min_need:
            kept = [r for r in requests if r.predicted_need >= self._min_need.get(r.resource_type, 0.0)]
            if len(kept) < len(requests):
                log.debug("prediction %s: %d requests below min_need left to the host", prediction.id,
                          len(requests) - len(kept))
            requests = kept
        if requests:
            log.debug("prediction %s -> %d requests from rules %s", prediction.id, len(requests),
                      sorted({rule.name for rule, _, _ in drafts}))
        return requests

    def observe_feedback(self, request: ResourceRequest, feedback: AllocationFeedback) -> bool:
        """Feeds the sizer the real use of a request this translator emitted.

        True if the sizer learnt from it; False without a sizer, without an
        actual_amount_used, for a request no rule of this translator made, or for one
        of a non-adaptive template."""
        if self._sizer is None or feedback.actual_amount_used is None:
            return False
        rule_name = request.metadata.triggering_pattern_id
        rule = next((r for r in self._rules if r.name == rule_name), None)
        if rule is None:
            return False
        template = next((t for t in rule.requests if t.resource_type == request.resource_type), None)
        if template is None or not template.adaptive:
            return False
        self._sizer.observe((rule.name, template.resource_type), feedback.actual_amount_used)
        return True

    def _build_request(self, rule: Rule, template: RequestTemplate, need: float,
                       prediction: Prediction) -> ResourceRequest:
        if self._sizer is not None and template.adaptive:
            need = self._sizer.size((rule.name, template.resource_type), need)
        request = ResourceRequest(
            resource_type=template.resource_type,
            predicted_need=need,
            confidence=prediction.confidence,
            priority=template.priority,
            duration=template.duration,
            deadline=prediction.expected_at,
            metadata=RequestMetadata(
                source_predictor_id=prediction.source_predictor_id,
                triggering_pattern_id=rule.name,
                target_application=prediction.target_application,
                target_process_id=prediction.target_process_id,
                custom_properties={**dict(template.properties), **prediction.properties},
            ),
            associated_prediction_id=prediction.id,
        )
        return request.validate()


def _template_need(rule: Rule, template: RequestTemplate, prediction: Prediction) -> float:
    if not template.need_from_value:
        assert template.need is not None  # guaranteed by _parse_request
        return template.need
    value = prediction.predicted_value
    if isinstance(value, bool):
        raise ValueError(f"rule {rule.name!r}: need_from_value needs a numeric predicted_value, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"rule {rule.name!r}: need_from_value needs a numeric predicted_value, not {value!r}") from None
    need = number * template.scale
    if not math.isfinite(need) or need < 0:
        raise ValueError(f"rule {rule.name!r}: predicted_value {value!r} x scale {template.scale} "
                         f"gives need {need!r}; it must be finite and >= 0")
    return need


# ---------------------------------------------------------------------------------------
# Parsing


def _parse_min_need(min_need: Any) -> dict[ResourceType, float]:
    if min_need is None:
        return {}
    if not isinstance(min_need, Mapping):
        raise TypeError(f"min_need must be a mapping of resource type to amount, not {type(min_need).__name__}")
    floors: dict[ResourceType, float] = {}
    for key, amount in min_need.items():
        if not isinstance(key, (str, ResourceType)):
            raise TypeError(f"min_need: keys must be ResourceType names, not {key!r}")
        try:
            resource_type = ResourceType.parse(key)
            floors[resource_type] = check_amount(f"min_need[{resource_type.name}]", amount)
        except ValueError as error:
            raise ValueError(f"min_need: {error}") from None
    return floors


def _parse_rule(raw: Any, index: int) -> Rule:
    where = f"rule #{index}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a table, not {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: field 'name' must be a non-empty string, not {name!r}")
    where = f"rule {name!r}"
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")

    match = raw.get("match")
    if not isinstance(match, Mapping):
        raise ValueError(f"{where}: field 'match' must be a table with at least 'type'")
    unknown = set(match) - _MATCH_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys in 'match' {sorted(unknown)}; allowed: {sorted(_MATCH_KEYS)}")
    prediction_type = match.get("type")
    if not isinstance(prediction_type, str) or not prediction_type:
        raise ValueError(f"{where}: field 'match.type' must be a non-empty string, not {prediction_type!r}")
    value = _optional_string(match, "value", where)
    target_application = _optional_string(match, "target_application", where)
    min_confidence = match.get("min_confidence")
    if min_confidence is not None:
        try:
            min_confidence = check_confidence(min_confidence)
        except ValueError as error:
            raise ValueError(f"{where}: field 'match.min_confidence': {error}") from None

    raw_requests = raw.get("request")
    if raw_requests is None or (isinstance(raw_requests, list) and not raw_requests):
        raise ValueError(f"{where}: a rule needs at least one [[rule.request]]")
    if not isinstance(raw_requests, list):
        raise ValueError(f"{where}: field 'request' must be an array of tables ([[rule.request]])")
    requests = tuple(_parse_request(r, f"{where} request #{i}") for i, r in enumerate(raw_requests))
    types_seen: set[ResourceType] = set()
    for template in requests:
        if template.resource_type in types_seen:
            raise ValueError(f"{where}: two requests of resource_type {template.resource_type.name}; "
                             "the sizer learns per (rule, resource type), so make a second rule")
        types_seen.add(template.resource_type)
    return Rule(name=name, prediction_type=prediction_type, requests=requests, value=value,
                target_application=target_application, min_confidence=min_confidence)


def _parse_request(raw: Any, where: str) -> RequestTemplate:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a table, not {type(raw).__name__}")
    unknown = set(raw) - _REQUEST_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_REQUEST_KEYS)}")
    raw_type = raw.get("resource_type")
    if not isinstance(raw_type, (str, ResourceType)):
        raise ValueError(f"{where}: field 'resource_type' must be a ResourceType name, not {raw_type!r}")
    try:
        resource_type = ResourceType.parse(raw_type)
    except ValueError as error:
        raise ValueError(f"{where}: field 'resource_type': {error}") from None

    need_from_value = raw.get("need_from_value", False)
    if not isinstance(need_from_value, bool):
        raise ValueError(f"{where}: field 'need_from_value' must be true or false, not {need_from_value!r}")
    has_need = "need" in raw
    if has_need == need_from_value:
        raise ValueError(f"{where}: give exactly one of 'need' and 'need_from_value = true'")
    need = _amount(raw, "need", where) if has_need else None
    if "scale" in raw and not need_from_value:
        raise ValueError(f"{where}: field 'scale' only applies with 'need_from_value = true'")
    scale = _amount(raw, "scale", where) if "scale" in raw else 1.0
    duration = _amount(raw, "duration", where) if raw.get("duration") is not None else None
    priority = raw.get("priority", 0.0)
    if not _is_number(priority) or not math.isfinite(priority):
        raise ValueError(f"{where}: field 'priority' must be a finite number, not {priority!r}")
    adaptive = raw.get("adaptive", True)
    if not isinstance(adaptive, bool):
        raise ValueError(f"{where}: field 'adaptive' must be true or false, not {adaptive!r}")
    properties = raw.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(k, str) for k in properties):
        raise ValueError(f"{where}: field 'properties' must be a table of named options, not {properties!r}")
    return RequestTemplate(resource_type=resource_type, need=need, need_from_value=need_from_value,
                           scale=scale, duration=duration, priority=float(priority), adaptive=adaptive,
                           properties=tuple(sorted(properties.items())))


def _amount(raw: Mapping[str, Any], field_name: str, where: str) -> float:
    try:
        return check_amount(field_name, raw[field_name])
    except ValueError as error:
        raise ValueError(f"{where}: field {field_name!r}: {error}") from None


def _optional_string(match: Mapping[str, Any], field_name: str, where: str) -> str | None:
    value = match.get(field_name)
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{where}: field 'match.{field_name}' must be a non-empty string, not {value!r}")
    return value


def _exact_or_glob(text: str, pattern: str) -> bool:
    # equality first: a literal pattern with glob characters ("v[1]") still matches itself
    return text == pattern or fnmatch.fnmatchcase(text, pattern)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    else:
        try:
            import tomli  # the same parser, packaged for Python 3.10
        except ModuleNotFoundError:
            raise RuntimeError("reading TOML rules on Python 3.10 needs the 'tomli' package "
                               "(pip install tomli); from_dict works without it") from None
        return tomli
