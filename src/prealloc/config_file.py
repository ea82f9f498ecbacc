"""A PreallocatorConfig from a TOML file (the spec's Configuration Manager), strictly.

Schema (every key optional; units as in ``prealloc.types``, seconds for times)::

    id = "editor-host"                  # non-empty string
    name = "EditorPreallocator"
    description = "..."
    immediate_processing = false
    min_confidence = 0.6                # 0..1
    capacity = 65536                    # int, 1..2**30
    tick = 0.001                        # seconds, 1 us .. 1 s
    pending_timeout = 30.0
    default_duration = 300.0
    allocation_workers = 2              # int, 1..64

    [headroom]                          # fraction of each type's total to leave free
    MEMORY = 0.10

    [quotas.per_request]                # the most one request may ask for
    MEMORY = 4096
    [quotas.per_type]                   # the most a type's live allocations may hold
    CPU = 400
    [quotas.per_application.editor]     # per application, per type
    MEMORY = 2048

    [translator]                        # a RuleTranslator
    rules_file = "rules.toml"           # relative to this file; or inline [[translator.rule]]
    min_need = { MEMORY = 32 }          # per-type floors
    sizer = true                        # an AdaptiveSizer with its defaults, or a table of
                                        # its options: { quantile = 0.9, window = 64, ... }

    [[translator.rule]]                 # the rule schema of prealloc.translate
    name = "open-editor"
    match = { type = "user_action", value = "open_*" }
    request = [{ resource_type = "MEMORY", need = 512 }]

    [predictor]                         # the built-in MarkovPredictor (prealloc.predict)
    kind = "markov"
    min_confidence = 0.4                # its options: max_predictions, decay, prior,
    duration = 30.0                     # horizon, max_states, max_outstanding, min_lead;
                                        # duration: of its preallocations, for the
                                        # translator made from it when [translator] is absent

Strict: an unknown key is refused naming it (with the keys that are allowed there), a
value of the wrong type naming the key and both types, a translator whose rules are
empty (an empty rules file, ``rule = []``) is refused, as is input nested deeper than
``MAX_DEPTH`` (before anything walks it: no RecursionError), a file over
``MAX_FILE_BYTES``, and a file that is not UTF-8 TOML. Every problem found is reported
at once: ``ConfigError.errors`` lists them, each naming its key path.

Objects other than the built-in predictor (monitors, strategies, emitters, an outside
predictor, loggers) are not configuration data: give them to ``PreallocatorConfig`` in
code, after loading (``dataclasses.replace(config, predictor=...)``).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .types import ResourceType

MAX_DEPTH = 16
MAX_FILE_BYTES = 1 << 20

_SCALARS: dict[str, tuple[str, Callable[[Any], bool]]] = {}


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(float(v))


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


_SCALARS = {
    "id": ("a string", _is_str),
    "name": ("a string", _is_str),
    "description": ("a string", _is_str),
    "immediate_processing": ("a boolean", _is_bool),
    "min_confidence": ("a number", _is_number),
    "capacity": ("an integer", _is_int),
    "tick": ("a number", _is_number),
    "pending_timeout": ("a number", _is_number),
    "default_duration": ("a number", _is_number),
    "allocation_workers": ("an integer", _is_int),
}
_TABLES = ("headroom", "quotas", "translator", "predictor")
_TOP_KEYS = frozenset(_SCALARS) | frozenset(_TABLES)
_QUOTA_KEYS = ("per_request", "per_type", "per_application")
_TRANSLATOR_KEYS = ("rules_file", "rule", "min_need", "sizer")
_SIZER_KEYS = ("quantile", "decay", "window", "margin", "min_samples", "max_step", "floor", "ceiling")
_MARKOV_INTS = ("max_predictions", "max_states", "max_outstanding")
_MARKOV_NUMBERS = ("min_confidence", "decay", "prior", "horizon", "min_lead")
_PREDICTOR_KEYS = ("kind", "id", "duration", *_MARKOV_INTS, *_MARKOV_NUMBERS)


class ConfigError(ValueError):
    """The configuration is not valid; ``errors`` lists every problem, each naming its key."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(f"{source}: " + "; ".join(self.errors))


def _toml() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ModuleNotFoundError:
        raise RuntimeError("reading TOML on Python 3.10 needs the 'tomli' package (pip install tomli)") from None
    return tomli


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether value nests tables/arrays deeper than limit, walked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's document; ConfigError for a file that is missing, too large, not
    UTF-8, not TOML, or nested too deeply."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as config_file:
            data = config_file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(source, [f"the file is larger than {MAX_FILE_BYTES} bytes"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    toml = _toml()
    try:
        document = toml.loads(text)
    except RecursionError:
        raise ConfigError(source, [f"nested deeper than {MAX_DEPTH} levels"]) from None
    except toml.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    if _too_deep(document):
        raise ConfigError(source, [f"nested deeper than {MAX_DEPTH} levels"])
    return document


def _type_amounts(raw: Any, where: str, errors: list[str], *, fraction: bool = False) -> dict[ResourceType, float]:
    if not isinstance(raw, dict):
        errors.append(f"{where}: must be a table of resource type = amount, not {_type_name(raw)}")
        return {}
    out: dict[ResourceType, float] = {}
    for key, value in raw.items():
        try:
            rtype = ResourceType.parse(key)
        except ValueError:
            errors.append(f"{where}.{key}: unknown resource type; valid types are {[t.name for t in ResourceType]}")
            continue
        if not _is_number(value) or value < 0 or (fraction and value >= 1):
            wanted = "a fraction in [0, 1)" if fraction else "a finite number >= 0"
            errors.append(f"{where}.{key}: must be {wanted}, not {value!r}")
            continue
        out[rtype] = float(value)
    return out


def _unknown(raw: Mapping[str, Any], allowed: tuple[str, ...] | frozenset[str], where: str, errors: list[str]) -> None:
    extra = sorted(set(raw) - set(allowed))
    for key in extra:
        place = f"{where}.{key}" if where else key
        errors.append(f"{place}: unknown key; allowed {'in ' + where if where else 'at the top'}: {sorted(allowed)}")


def _quotas(raw: Any, errors: list[str]) -> Any:
    from .quotas import Quotas

    if not isinstance(raw, dict):
        errors.append(f"quotas: must be a table, not {_type_name(raw)}")
        return None
    _unknown(raw, _QUOTA_KEYS, "quotas", errors)
    per_request = _type_amounts(raw.get("per_request", {}), "quotas.per_request", errors)
    per_type = _type_amounts(raw.get("per_type", {}), "quotas.per_type", errors)
    per_app_raw = raw.get("per_application", {})
    per_application: dict[str, dict[ResourceType, float]] = {}
    if not isinstance(per_app_raw, dict):
        errors.append(f"quotas.per_application: must be a table of application = {{type = amount}}, "
                      f"not {_type_name(per_app_raw)}")
    else:
        for app, limits in per_app_raw.items():
            per_application[app] = _type_amounts(limits, f"quotas.per_application.{app}", errors)
    return Quotas(per_request=dict(per_request), per_type=dict(per_type),  # type: ignore[arg-type]
                  per_application=per_application)  # type: ignore[arg-type]


def _translator(raw: Any, base_dir: Path, errors: list[str]) -> Any:
    from .translate import AdaptiveSizer, RuleTranslator

    if not isinstance(raw, dict):
        errors.append(f"translator: must be a table, not {_type_name(raw)}")
        return None
    _unknown(raw, _TRANSLATOR_KEYS, "translator", errors)
    sizer = None
    sizer_raw = raw.get("sizer", False)
    if isinstance(sizer_raw, bool):
        sizer = AdaptiveSizer() if sizer_raw else None
    elif isinstance(sizer_raw, dict):
        before = len(errors)
        _unknown(sizer_raw, _SIZER_KEYS, "translator.sizer", errors)
        for key, value in sizer_raw.items():
            if key in _SIZER_KEYS and not _is_number(value):
                errors.append(f"translator.sizer.{key}: must be a number, not {_type_name(value)}")
        if len(errors) == before:
            try:
                sizer = AdaptiveSizer(**sizer_raw)
            except (TypeError, ValueError) as exc:
                errors.append(f"translator.sizer: {exc}")
    else:
        errors.append(f"translator.sizer: must be a boolean or a table of AdaptiveSizer options, "
                      f"not {_type_name(sizer_raw)}")
    min_need = _type_amounts(raw.get("min_need", {}), "translator.min_need", errors)
    has_file, has_inline = "rules_file" in raw, "rule" in raw
    if has_file == has_inline:
        errors.append("translator: give exactly one of rules_file and [[translator.rule]]")
        return None
    if has_file:
        name = raw["rules_file"]
        if not isinstance(name, str) or not name:
            errors.append(f"translator.rules_file: must be a path string, not {_type_name(name)}")
            return None
        path = Path(name) if os.path.isabs(name) else base_dir / name
        try:
            document = read_toml(path)
        except ConfigError as exc:
            errors.extend(f"translator.rules_file ({path}): {e}" for e in exc.errors)
            return None
        where = f"translator.rules_file ({path})"
    else:
        document = {"rule": raw["rule"]}
        where = "translator.rule"
    rules = document.get("rule")
    if not document or rules == [] or (isinstance(rules, list) and not rules):
        errors.append(f"{where}: no rules (an empty rules file is refused: a translator without rules "
                      "turns every prediction into nothing)")
        return None
    try:
        floors: dict[ResourceType | str, float] = {t: v for t, v in min_need.items()}
        return RuleTranslator.from_dict(document, sizer=sizer, min_need=floors or None)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {exc}")
        return None


def _predictor(raw: Any, errors: list[str]) -> tuple[Any, float | None]:
    """The MarkovPredictor of a [predictor] table and the duration for its translator."""
    from .predict import MarkovPredictor

    if not isinstance(raw, dict):
        errors.append(f"predictor: must be a table, not {_type_name(raw)}")
        return None, None
    before = len(errors)
    _unknown(raw, _PREDICTOR_KEYS, "predictor", errors)
    kind = raw.get("kind")
    if kind != "markov":
        errors.append(f"predictor.kind: must be \"markov\" (the built-in MarkovPredictor), not {kind!r}")
    options: dict[str, Any] = {}
    for key in _MARKOV_INTS:
        if key in raw:
            if not _is_int(raw[key]):
                errors.append(f"predictor.{key}: must be an integer, not {_type_name(raw[key])}")
            options[key] = raw[key]
    for key in _MARKOV_NUMBERS:
        if key in raw:
            if not _is_number(raw[key]):
                errors.append(f"predictor.{key}: must be a number, not {_type_name(raw[key])}")
            options[key] = raw[key]
    if "id" in raw:
        if not isinstance(raw["id"], str) or not raw["id"]:
            errors.append(f"predictor.id: must be a non-empty string, not {raw['id']!r}")
        options["id"] = raw["id"]
    duration = raw.get("duration", 30.0)
    if not _is_number(duration) or duration <= 0:
        errors.append(f"predictor.duration: must be a number of seconds > 0, not {duration!r}")
    if len(errors) > before:
        return None, None
    try:
        return MarkovPredictor(**options), float(duration)
    except (TypeError, ValueError) as exc:
        errors.append(f"predictor: {exc}")
        return None, None


def config_from_dict(document: Mapping[str, Any], *, source: str = "<config>",
                     base_dir: str | os.PathLike[str] | None = None) -> Any:
    """A validated PreallocatorConfig from a mapping shaped like the TOML file.
    ConfigError listing every problem. ``base_dir``: where a relative rules_file is."""
    from .engine import PreallocatorConfig

    if not isinstance(document, Mapping):
        raise ConfigError(source, [f"the configuration must be a table, not {_type_name(document)}"])
    document = dict(document)
    if _too_deep(document):
        raise ConfigError(source, [f"nested deeper than {MAX_DEPTH} levels"])
    if not document:
        raise ConfigError(source, ["the configuration is empty"])
    if set(document) == {"rule"}:
        raise ConfigError(source, ["this is a rules file ([[rule]] only); a configuration names it in "
                                   "[translator] rules_file = ..."])
    errors: list[str] = []
    _unknown(document, _TOP_KEYS, "", errors)
    values: dict[str, Any] = {}
    for key, (wanted, check) in _SCALARS.items():
        if key in document:
            value = document[key]
            if not check(value):
                errors.append(f"{key}: must be {wanted}, not {_type_name(value)} ({value!r})")
            else:
                values[key] = value
    if "headroom" in document:
        values["headroom"] = _type_amounts(document["headroom"], "headroom", errors, fraction=True)
    if "quotas" in document:
        try:
            values["quotas"] = _quotas(document["quotas"], errors)
        except (TypeError, ValueError) as exc:
            errors.append(f"quotas: {exc}")
    if "translator" in document:
        values["translator"] = _translator(document["translator"], Path(base_dir or "."), errors)
    if "predictor" in document:
        model, duration = _predictor(document["predictor"], errors)
        if model is not None:
            values["predictor"] = model
            if "translator" not in document:  # its predictions, turned into requests
                values["translator"] = model.translator(duration=duration)
    if errors:
        raise ConfigError(source, errors)
    config = PreallocatorConfig(**{k: v for k, v in values.items() if v is not None})
    try:
        config.validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, [str(exc)]) from None
    known = {f.name for f in fields(PreallocatorConfig)}
    assert set(values) <= known, sorted(set(values) - known)  # the schema names only real fields
    return config


def load_config(path: str | os.PathLike[str]) -> Any:
    """A validated PreallocatorConfig from the TOML file at path (schema above)."""
    source = os.fspath(path)
    document = read_toml(source)
    return config_from_dict(document, source=source, base_dir=Path(source).resolve().parent)


def check_file(path: str | os.PathLike[str]) -> list[str]:
    """The problems of a configuration file — or of a rules file (``[[rule]]`` only),
    checked as the translator would load it; empty when it is valid."""
    from .translate import RuleTranslator

    source = os.fspath(path)
    try:
        document = read_toml(source)
        if not document:
            return ["the file is empty (neither a configuration nor rules)"]
        if set(document) == {"rule"}:
            if not document["rule"]:
                return ["no rules (an empty rules file is refused)"]
            RuleTranslator.from_dict(document)
            return []
        config_from_dict(document, source=source, base_dir=Path(source).resolve().parent)
    except ConfigError as exc:
        return exc.errors
    except (TypeError, ValueError) as exc:
        return [str(exc)]
    return []


__all__ = ["ConfigError", "MAX_DEPTH", "MAX_FILE_BYTES", "check_file", "config_from_dict", "load_config",
           "read_toml"]
