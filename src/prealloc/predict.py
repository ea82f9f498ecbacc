"""The built-in predictor: a Markov / frequency model over need events, in the spirit of
the ``preload`` daemon (Behdad Esfahbod, 2006: a Markov chain over which applications
run after which, with exponentially decayed counts, driving readahead).

Here the chain's states are *needs*: ``(application, resource type, amount bucket)``.
The host reports each need as it happens (``observe(application, resource_type,
amount)``, typically right where it calls ``acquire``); the model counts transitions
"need A was followed by need B" (every application's needs in one stream, so "the
editor needs 512 MiB after the browser needed 64" is learned as well as a single
application's sequence). After each observation it looks at the row of the new state
and, for the likeliest next needs, emits a :class:`~prealloc.types.Prediction` to its
``prediction:generated`` listeners — the allocator's ``handle_prediction``, wired by
``PreallocatorConfig(predictor=model, translator=model.translator())``.

Confidence of a next need B after A::

    p(B | A)  = w(A -> B) / (sum over C of w(A -> C) + prior)       (decayed counts)
    precision = (used(A -> B) + 2) / (used(A -> B) + unused(A -> B) + 2)
    confidence = p(B | A) * precision

``prior`` keeps a transition seen once from looking certain. ``precision`` is what
``update_model`` teaches: each outcome of a prediction's request (the allocator calls
it exactly once per request) marks its transition used or unused (expired or released
unused); failed and cancelled requests teach nothing about the model (a prediction
whose rule emits several requests learns from the first of them to end). Counts of a
state decay by ``decay`` each time the state is left, so a changed habit is followed.

Amounts: a need's amount is bucketed (quarter octaves); the amount predicted for a
bucket is the largest of the last few amounts seen in it, or used in it, so the
preallocation covers the need it predicts.

Predictions are typed ``resource_usage:<TYPE>`` with the amount as predicted_value, and
``model.translator()`` returns the RuleTranslator whose rules turn them into requests of
that type (``need_from_value``). A transition with a prediction outstanding (no outcome
yet, younger than ``horizon`` seconds) is not predicted again. ``expected_at`` (the
request's deadline, on the monotonic clock) is now plus the transition's mean gap, but
at least ``min_lead`` seconds: a deadline sooner than the worker can allocate would drop
the request instead of serving the need a little late. ``clock`` (gaps, the horizon) may
be replaced, for tests.

Memory is bounded: at most ``max_states`` states (the least recently seen is
forgotten) and ``max_outstanding`` predictions waiting for their outcome.

The engine emits no event when a need is met (a claim), and its events carry no
application, so the model is fed by ``observe`` rather than by listening to them.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .types import AllocationFeedback, Prediction, PredictionType, ResourceType, check_amount

log = logging.getLogger(__name__)

GENERATED = "prediction:generated"
_BUCKETS_PER_OCTAVE = 4
_REASONS = ("released", "expired", "failed", "cancelled")

State = tuple[str | None, ResourceType, int]  # (application, type, amount bucket)


def _bucket(amount: float) -> int:
    if amount <= 0:
        return -(1 << 30)
    return math.ceil(math.log2(amount) * _BUCKETS_PER_OCTAVE)


@dataclass
class _Row:
    """A state's outgoing transitions and what it knows of its own amounts."""

    weights: dict[State, float] = field(default_factory=dict)
    used: dict[State, int] = field(default_factory=dict)
    unused: dict[State, int] = field(default_factory=dict)
    gaps: dict[State, float] = field(default_factory=dict)  # mean seconds A -> B (EWMA)
    amounts: deque[float] = field(default_factory=lambda: deque(maxlen=8))


@dataclass
class _Outstanding:
    source: State
    target: State
    at: float


def prediction_type(resource_type: ResourceType | str) -> str:
    """The Prediction.type the model uses for needs of resource_type."""
    return f"{PredictionType.RESOURCE_USAGE.value}:{ResourceType.parse(resource_type).name}"


class MarkovPredictor:
    """See the module docstring. Thread-safe; listeners run on the observing thread,
    outside the model's lock."""

    def __init__(self, *, id: str | None = None, min_confidence: float = 0.3, max_predictions: int = 2,
                 decay: float = 0.95, prior: float = 1.0, horizon: float = 30.0, max_states: int = 4096,
                 max_outstanding: int = 65536, min_lead: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if id is not None and (not isinstance(id, str) or not id):
            raise ValueError(f"id must be a non-empty string or None, not {id!r}")
        if isinstance(min_confidence, bool) or not isinstance(min_confidence, (int, float)) \
                or not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be a number in [0, 1], not {min_confidence!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be a number in (0, 1], not {decay!r}")
        for name, value in (("max_predictions", max_predictions), ("max_states", max_states),
                            ("max_outstanding", max_outstanding)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        self.prior = check_amount("prior", prior)
        self.horizon = check_amount("horizon", horizon)
        self.min_lead = check_amount("min_lead", min_lead)
        self.id = id or f"markov-{uuid.uuid4().hex[:8]}"
        self.min_confidence = float(min_confidence)
        self.max_predictions = max_predictions
        self.decay = float(decay)
        self.max_states = max_states
        self.max_outstanding = max_outstanding
        self._clock = clock
        self._lock = threading.Lock()
        self._rows: OrderedDict[State, _Row] = OrderedDict()  # LRU: the oldest first
        self._last: State | None = None
        self._last_at = 0.0
        self._outstanding: OrderedDict[str, _Outstanding] = OrderedDict()
        self._pending_targets: dict[tuple[State, State], str] = {}
        self._listeners: tuple[Callable[[Prediction], Any], ...] = ()
        self._ids = itertools.count(1)
        self.observations = 0
        self.emitted = 0
        self.outcomes = {reason: 0 for reason in _REASONS}

    # ------------------------------------------------------------------ the Predictor protocol
    def on(self, event: str, listener: Callable[[Prediction], Any]) -> Callable[[Prediction], Any]:
        """Adds a listener of 'prediction:generated' (the only event); returns it."""
        if event != GENERATED:
            raise ValueError(f"unknown event {event!r}; the predictor emits only {GENERATED!r}")
        if not callable(listener):
            raise TypeError(f"listener must be callable, not {type(listener).__name__}")
        with self._lock:
            self._listeners = self._listeners + (listener,)
        return listener

    def off(self, event: str, listener: Callable[[Prediction], Any]) -> bool:
        if event != GENERATED:
            raise ValueError(f"unknown event {event!r}; the predictor emits only {GENERATED!r}")
        with self._lock:
            if listener not in self._listeners:
                return False
            i = self._listeners.index(listener)
            self._listeners = self._listeners[:i] + self._listeners[i + 1:]
            return True

    def update_model(self, outcome: Any, feedback: AllocationFeedback | None = None) -> None:
        """Learns from how a prediction's request ended: a PredictionOutcome (or any
        object with prediction_id, used, used_amount, reason), or the legacy
        ``(prediction_id, AllocationFeedback)``. An unknown prediction id (not this
        model's, or forgotten) is ignored."""
        if isinstance(outcome, str):
            if not isinstance(feedback, AllocationFeedback):
                raise TypeError("update_model(prediction_id, feedback) needs an AllocationFeedback, not "
                                f"{type(feedback).__name__}")
            prediction_id, used = outcome, feedback.used_successfully
            used_amount, reason = feedback.actual_amount_used, "released"
        else:
            try:
                prediction_id, used = outcome.prediction_id, outcome.used
                used_amount, reason = outcome.used_amount, outcome.reason
            except AttributeError as exc:
                raise TypeError(f"outcome must have prediction_id, used, used_amount and reason: {exc}") from None
            if not isinstance(used, bool):
                raise TypeError(f"outcome.used must be a bool, not {type(used).__name__}")
            if reason not in _REASONS:
                raise ValueError(f"outcome.reason must be one of {_REASONS}, not {reason!r}")
        with self._lock:
            entry = self._outstanding.pop(prediction_id, None)
            if entry is None:
                return
            self.outcomes[reason] += 1
            key = (entry.source, entry.target)
            if self._pending_targets.get(key) == prediction_id:
                del self._pending_targets[key]
            row = self._rows.get(entry.source)
            if row is None or reason in ("failed", "cancelled"):
                return  # the machine or the host said no: nothing learned about the habit
            if used:
                row.used[entry.target] = row.used.get(entry.target, 0) + 1
                target_row = self._rows.get(entry.target)
                if target_row is not None and used_amount:
                    target_row.amounts.append(float(used_amount))
            else:
                row.unused[entry.target] = row.unused.get(entry.target, 0) + 1

    # ------------------------------------------------------------------ the feed
    def observe(self, application: str | None, resource_type: ResourceType | str, amount: float) -> list[Prediction]:
        """One need: application needed amount of resource_type now. Updates the chain and
        emits (and returns) the predictions of the next needs."""
        if application is not None and not isinstance(application, str):
            raise TypeError(f"application must be a str or None, not {type(application).__name__}")
        rtype = ResourceType.parse(resource_type)
        amount = check_amount("amount", amount)
        now = self._clock()
        state: State = (application, rtype, _bucket(amount))
        with self._lock:
            self.observations += 1
            row = self._row(state)
            row.amounts.append(amount)
            previous = self._last
            if previous is not None and previous in self._rows:
                prev_row = self._rows[previous]
                for target in prev_row.weights:
                    prev_row.weights[target] *= self.decay
                prev_row.weights[state] = prev_row.weights.get(state, 0.0) + 1.0
                gap = max(0.0, now - self._last_at)
                old = prev_row.gaps.get(state)
                prev_row.gaps[state] = gap if old is None else 0.7 * old + 0.3 * gap
            self._last, self._last_at = state, now
            self._expire_outstanding(now)
            predictions = self._predict_from(state, now)
            listeners = self._listeners
        for prediction in predictions:
            for listener in listeners:
                try:
                    listener(prediction)
                except Exception:
                    log.exception("prediction listener %r raised", listener)
        return predictions

    # ------------------------------------------------------------------ reading the model
    def next_needs(self, application: str | None, resource_type: ResourceType | str,
                   amount: float) -> list[tuple[str | None, ResourceType, float, float]]:
        """The model's view after a need, without emitting: (application, type, amount,
        confidence) of the likely next needs, likeliest first."""
        state: State = (application, ResourceType.parse(resource_type), _bucket(check_amount("amount", amount)))
        with self._lock:
            row = self._rows.get(state)
            if row is None:
                return []
            return [(t[0], t[1], self._amount_for(t), c) for t, c in self._ranked(row)]

    def translator(self, *, duration: float | None = 30.0, types: Iterable[ResourceType | str] | None = None,
                   priority: float = 0.0) -> Any:
        """A RuleTranslator that turns this model's predictions into requests: one rule
        per resource type (``resource_usage:<TYPE>`` -> need = predicted amount), with
        ``duration`` seconds before an unclaimed preallocation expires."""
        from .translate import RuleTranslator

        wanted = [ResourceType.parse(t) for t in types] if types is not None else list(ResourceType)
        request: dict[str, Any] = {"need_from_value": True, "adaptive": False, "priority": priority}
        if duration is not None:
            request["duration"] = duration
        return RuleTranslator.from_dict({"rule": [
            {"name": f"markov-{t.name}", "match": {"type": prediction_type(t)},
             "request": [{"resource_type": t.name, **request}]} for t in wanted]})

    def __len__(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------ inside the lock
    def _row(self, state: State) -> _Row:
        row = self._rows.get(state)
        if row is None:
            row = self._rows[state] = _Row()
            while len(self._rows) > self.max_states:
                forgotten, _ = self._rows.popitem(last=False)
                for other in self._rows.values():
                    for table in (other.weights, other.used, other.unused, other.gaps):
                        table.pop(forgotten, None)
        else:
            self._rows.move_to_end(state)
        return row

    def _ranked(self, row: _Row) -> list[tuple[State, float]]:
        total = sum(row.weights.values()) + self.prior
        ranked = []
        for target, weight in row.weights.items():
            used, unused = row.used.get(target, 0), row.unused.get(target, 0)
            confidence = (weight / total) * (used + 2) / (used + unused + 2)
            ranked.append((target, min(1.0, confidence)))
        ranked.sort(key=lambda item: -item[1])
        return ranked

    def _amount_for(self, state: State) -> float:
        row = self._rows.get(state)
        if row is not None and row.amounts:
            return max(row.amounts)
        return 2.0 ** (state[2] / _BUCKETS_PER_OCTAVE)

    def _predict_from(self, state: State, now: float) -> list[Prediction]:
        row = self._rows[state]
        out: list[Prediction] = []
        for target, confidence in self._ranked(row):
            if len(out) >= self.max_predictions or confidence < self.min_confidence:
                break
            if (state, target) in self._pending_targets:
                continue  # its preallocation is still out there
            application, rtype, _ = target
            gap = row.gaps.get(target)
            prediction_id = f"{self.id}-{next(self._ids)}"
            prediction = Prediction(
                prediction_id, prediction_type(rtype), self._amount_for(target), confidence,
                expected_at=time.monotonic() + max(gap or 0.0, self.min_lead), target_application=application,
                source_predictor_id=self.id,
                properties={"after": [state[0], state[1].name, self._amount_for(state)]})
            self._outstanding[prediction_id] = _Outstanding(state, target, now)
            self._pending_targets[(state, target)] = prediction_id
            while len(self._outstanding) > self.max_outstanding:
                old_id, old = self._outstanding.popitem(last=False)
                self._pending_targets.pop((old.source, old.target), None)
            self.emitted += 1
            out.append(prediction)
        return out

    def _expire_outstanding(self, now: float) -> None:
        # Outcomes normally end these; a prediction whose outcome never came (no
        # allocator wired to update_model, or one that skipped it) stops blocking its
        # transition after horizon seconds.
        while self._outstanding:
            prediction_id, entry = next(iter(self._outstanding.items()))
            if now - entry.at < self.horizon:
                break
            del self._outstanding[prediction_id]
            self._pending_targets.pop((entry.source, entry.target), None)


__all__ = ["GENERATED", "MarkovPredictor", "prediction_type"]
