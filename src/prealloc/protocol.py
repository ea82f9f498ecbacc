"""The broker's wire protocol, version 1 (docs/protocol.md is the contract): the limits,
the message codec and the JSON form of the spec's types, shared by ``prealloc.server``
and ``prealloc.client``.

One message is one SOCK_SEQPACKET datagram holding one UTF-8 JSON object of at most
``MAX_MESSAGE`` bytes, with at most ``MAX_FDS`` descriptors in one SCM_RIGHTS control
message. ``decode_message`` refuses everything else with a ``ProtocolError``; the
``*_to_json`` / ``*_from_json`` pairs turn the spec's dataclasses into plain JSON
values and back, checking every field on the way in (the broker never trusts them).
"""
from __future__ import annotations

import enum
import json
import math
import os
import stat
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

from .types import (
    AllocationFeedback,
    AllocationStatus,
    Prediction,
    PreallocatorStatistics,
    RequestMetadata,
    ResourceAllocation,
    ResourceRequest,
    ResourceType,
)

VERSION = 1
VERSIONS = (1,)
MAX_MESSAGE = 65536
MAX_FDS = 4
MAX_PROTOCOL_ERRORS = 3
MAX_ID = 2**53  # ids are JSON numbers every client can hold exactly (a double's integers)
MAX_IDS_PER_CALL = 1024  # allocation_ids of one wait_ready

OPS = ("hello", "request_preallocation", "submit", "handle_prediction", "wait_ready", "claim", "acquire",
       "adjust_allocation", "release_allocation", "cancel_request", "get_allocation", "allocations",
       "get_statistics", "status", "subscribe", "bye")

# The error types an answer may carry (docs/protocol.md).
ERROR_TYPES = ("ValueError", "TypeError", "KeyError", "PermissionError", "AllocationError",
               "InsufficientResources", "QuotaExceeded", "Timeout", "RateLimited", "ProtocolError",
               "VersionError", "Closed", "WrongResourceType")


class BrokerError(Exception):
    """An error the broker answered that has no built-in or prealloc exception of its own."""


class ProtocolError(BrokerError):
    """A message that breaks the protocol: too large, not UTF-8 JSON, not an object,
    unexpected descriptors, a bad field."""


class VersionError(ProtocolError):
    """A protocol version the other side does not speak (``versions`` lists its own)."""

    def __init__(self, message: str, versions: tuple[int, ...] | list[int] = VERSIONS) -> None:
        super().__init__(message)
        self.versions = list(versions)


class RateLimited(BrokerError):
    """The peer sent more requests per second than the broker's ``rate_limit``."""


class WrongResourceType(TypeError):
    """A claim that named the resource type it expects, of an allocation of another type:
    refused, and the allocation is left as it was (not claimed)."""


class Closed(ConnectionError):
    """The connection to the broker is closed (the broker drained, or dropped the peer)."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def decode_message(data: bytes) -> dict[str, Any]:
    """The JSON object of one message; ProtocolError for anything else."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is larger than {MAX_MESSAGE}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"message is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("message nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"message must be a JSON object, not {type(value).__name__}")
    return value


def encode_message(message: Mapping[str, Any]) -> bytes:
    """One message's bytes; ValueError when it would be larger than MAX_MESSAGE."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"message of {len(data)} bytes is larger than {MAX_MESSAGE}")
    return data


def check_id(value: Any, name: str = "id") -> int:
    if type(value) is not int or not 0 <= value < MAX_ID:
        raise TypeError(f"{name} must be an int in 0..2**53-1, not {value!r}"[:200])
    return value


def check_allocation_id(value: Any, name: str = "allocation_id") -> int:
    if type(value) is not int or not 0 < value < 2**64:
        raise TypeError(f"{name} must be a positive int, not {value!r}"[:200])
    return value


# ---------------------------------------------------------------------------------------
# values


def plain(value: Any, depth: int = 0) -> Any:
    """value as JSON data: enums by lower-case name, sets and tuples as lists (sets
    sorted), paths as strings, non-finite floats as null, anything else by str()."""
    if depth > 16:
        return None
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(plain(k, depth + 1)): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        try:
            items: list[Any] = sorted(value)
        except TypeError:
            items = list(value)
        return [plain(v, depth + 1) for v in items]
    if isinstance(value, (list, tuple)):
        return [plain(v, depth + 1) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return plain(value.item(), depth + 1)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return str(value)


def resource_type_from_json(value: Any, name: str = "resource_type") -> ResourceType:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"{name} must be a resource type name, not {type(value).__name__}")
    return ResourceType.parse(value)


def status_from_json(value: Any, name: str = "status") -> AllocationStatus:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a status name, not {type(value).__name__}")
    try:
        return AllocationStatus[value.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown {name} {value[:40]!r}; valid: {[s.name.lower() for s in AllocationStatus]}") \
            from None


def feedback_to_json(feedback: AllocationFeedback | None) -> dict[str, Any] | None:
    if feedback is None:
        return None
    return {"used_successfully": feedback.used_successfully, "actual_duration": plain(feedback.actual_duration),
            "actual_amount_used": plain(feedback.actual_amount_used),
            "reason_for_release": feedback.reason_for_release}


def feedback_from_json(value: Any) -> AllocationFeedback | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"feedback must be an object, not {type(value).__name__}")
    _only(value, ("used_successfully", "actual_duration", "actual_amount_used", "reason_for_release"), "feedback")
    reason = value.get("reason_for_release")
    if reason is not None and not isinstance(reason, str):
        raise TypeError("feedback.reason_for_release must be a string or null")
    feedback = AllocationFeedback(used_successfully=value.get("used_successfully", True),
                                  actual_duration=value.get("actual_duration"),
                                  actual_amount_used=value.get("actual_amount_used"),
                                  reason_for_release=reason[:256] if reason else reason)
    return feedback.validate()


def allocation_to_json(allocation: ResourceAllocation, *, owner_pid: int | None = None,
                       owner_uid: int | None = None) -> dict[str, Any]:
    return {
        "allocation_id": allocation.allocation_id,
        "request_id": allocation.request_id if isinstance(allocation.request_id, str)
        else int(allocation.request_id),
        "resource_type": allocation.resource_type.name.lower(),
        "amount": plain(allocation.allocated_amount),
        "requested_amount": plain(allocation.requested_amount),
        "allocated_amount": plain(allocation.allocated_amount),
        "status": allocation.status.name.lower(),
        "allocated_at": plain(allocation.allocated_at),
        "expires_at": plain(allocation.expires_at),
        "actual_usage": plain(allocation.actual_usage),
        "feedback": feedback_to_json(allocation.feedback),
        "failure_reason": allocation.failure_reason,
        "details": plain(allocation.details),
        "owner_pid": owner_pid,
        "owner_uid": owner_uid,
    }


def allocation_from_json(value: Any) -> ResourceAllocation:
    """A ResourceAllocation from the broker's object; the owner's pid and uid go into
    ``details`` (``owner_pid``, ``owner_uid``)."""
    if not isinstance(value, dict):
        raise ProtocolError(f"an allocation must be an object, not {type(value).__name__}")
    try:
        details = dict(value.get("details") or {})
        for key in ("owner_pid", "owner_uid"):
            if value.get(key) is not None:
                details[key] = value[key]
        return ResourceAllocation(
            allocation_id=check_allocation_id(value["allocation_id"]),
            request_id=value["request_id"],
            resource_type=resource_type_from_json(value["resource_type"]),
            requested_amount=float(value.get("requested_amount", value.get("amount")) or 0.0),
            allocated_amount=float(value.get("allocated_amount", value.get("amount")) or 0.0),
            status=status_from_json(value["status"]),
            allocated_at=value.get("allocated_at"),
            expires_at=value.get("expires_at"),
            actual_usage=value.get("actual_usage"),
            feedback=feedback_from_json(value.get("feedback")),
            failure_reason=value.get("failure_reason"),
            details=details,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"bad allocation from the broker: {exc!r}") from None


def _only(value: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(value) - set(allowed))
    if extra:
        raise ValueError(f"{where}: unknown fields {extra[:8]}; allowed {sorted(allowed)}")


_METADATA_FIELDS = ("source_predictor_id", "triggering_pattern_id", "target_application", "target_process_id",
                    "user_id", "custom_properties")
_REQUEST_FIELDS = ("resource_type", "predicted_need", "confidence", "priority", "duration", "deadline",
                   "request_id", "associated_prediction_id", "metadata")


def _optional_str(value: Mapping[str, Any], key: str, where: str) -> str | None:
    item = value.get(key)
    if item is not None and not isinstance(item, str):
        raise TypeError(f"{where}.{key} must be a string or null, not {type(item).__name__}")
    if item is not None and len(item) > 256:
        raise ValueError(f"{where}.{key} is longer than 256 characters")
    return item


def request_to_json(request: ResourceRequest) -> dict[str, Any]:
    m = request.metadata
    return {
        "resource_type": request.resource_type.name.lower(),
        "predicted_need": request.predicted_need,
        "confidence": request.confidence,
        "priority": request.priority,
        "duration": request.duration,
        "deadline": request.deadline,
        "request_id": request.request_id,
        "associated_prediction_id": request.associated_prediction_id,
        "metadata": {"source_predictor_id": m.source_predictor_id, "triggering_pattern_id": m.triggering_pattern_id,
                     "target_application": m.target_application, "target_process_id": m.target_process_id,
                     "user_id": m.user_id, "custom_properties": plain(m.custom_properties)},
    }


def request_from_json(value: Any) -> ResourceRequest:
    """A validated ResourceRequest from its object; TypeError / ValueError naming the
    field. ``created_at`` is always now (the receiver's clock)."""
    if not isinstance(value, dict):
        raise TypeError(f"the request must be an object, not {type(value).__name__}")
    _only(value, _REQUEST_FIELDS, "request")
    for key in ("resource_type", "predicted_need"):
        if key not in value:
            raise ValueError(f"request.{key} is missing")
    raw_meta = value.get("metadata") or {}
    if not isinstance(raw_meta, dict):
        raise TypeError(f"request.metadata must be an object, not {type(raw_meta).__name__}")
    _only(raw_meta, _METADATA_FIELDS, "request.metadata")
    props = raw_meta.get("custom_properties") or {}
    if not isinstance(props, dict):
        raise TypeError("request.metadata.custom_properties must be an object")
    metadata = RequestMetadata(
        source_predictor_id=_optional_str(raw_meta, "source_predictor_id", "request.metadata") or "unknown",
        triggering_pattern_id=_optional_str(raw_meta, "triggering_pattern_id", "request.metadata"),
        target_application=_optional_str(raw_meta, "target_application", "request.metadata"),
        target_process_id=raw_meta.get("target_process_id"),
        user_id=_optional_str(raw_meta, "user_id", "request.metadata"),
        custom_properties=props)
    kwargs: dict[str, Any] = {"resource_type": resource_type_from_json(value["resource_type"]),
                              "predicted_need": value["predicted_need"], "metadata": metadata}
    for key in ("confidence", "priority", "duration", "deadline"):
        if value.get(key) is not None:
            kwargs[key] = value[key]
    if value.get("request_id") is not None:
        kwargs["request_id"] = value["request_id"]
    kwargs["associated_prediction_id"] = _optional_str(value, "associated_prediction_id", "request")
    return ResourceRequest(**kwargs).validate()


_PREDICTION_FIELDS = ("id", "type", "predicted_value", "confidence", "expected_at", "target_application",
                      "target_process_id", "source_predictor_id", "properties")


def prediction_to_json(prediction: Prediction) -> dict[str, Any]:
    return {"id": prediction.id, "type": str(prediction.type), "predicted_value": plain(prediction.predicted_value),
            "confidence": prediction.confidence, "expected_at": prediction.expected_at,
            "target_application": prediction.target_application,
            "target_process_id": prediction.target_process_id,
            "source_predictor_id": prediction.source_predictor_id, "properties": plain(prediction.properties)}


def prediction_from_json(value: Any) -> Prediction:
    if not isinstance(value, dict):
        raise TypeError(f"the prediction must be an object, not {type(value).__name__}")
    _only(value, _PREDICTION_FIELDS, "prediction")
    for key in ("id", "type", "confidence"):
        if key not in value:
            raise ValueError(f"prediction.{key} is missing")
    props = value.get("properties") or {}
    if not isinstance(props, dict):
        raise TypeError("prediction.properties must be an object")
    prediction = Prediction(id=value["id"], type=value["type"], predicted_value=value.get("predicted_value"),
                            confidence=value["confidence"], expected_at=value.get("expected_at"),
                            target_application=_optional_str(value, "target_application", "prediction"),
                            target_process_id=value.get("target_process_id"),
                            source_predictor_id=_optional_str(value, "source_predictor_id", "prediction")
                            or "unknown",
                            properties=props)
    if isinstance(prediction.target_process_id, bool):
        raise ValueError("prediction.target_process_id must be a positive int")
    return prediction.validate()


def statistics_to_json(stats: PreallocatorStatistics) -> dict[str, Any]:
    return {f.name: plain(getattr(stats, f.name)) for f in fields(PreallocatorStatistics)}


def statistics_from_json(value: Any) -> PreallocatorStatistics:
    if not isinstance(value, dict):
        raise ProtocolError(f"statistics must be an object, not {type(value).__name__}")
    known = {f.name for f in fields(PreallocatorStatistics)}
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            continue  # a newer broker's figure
        if key in ("allocations_by_type", "waste_rate_by_type") and isinstance(item, dict):
            item = {ResourceType.parse(t): v for t, v in item.items()}
        kwargs[key] = item
    return PreallocatorStatistics(**kwargs)


# ---------------------------------------------------------------------------------------
# where the socket is (docs/protocol.md)


def runtime_socket_path(uid: int | None = None) -> Path:
    """Step 3/4 of docs/protocol.md for uid (default: the effective uid)."""
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return Path("/run/prealloc-broker/broker.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and uid == os.geteuid() and os.path.isdir(runtime):
        return Path(runtime) / "prealloc-broker.sock"
    return Path(f"/tmp/prealloc-broker-{uid}") / "broker.sock"


def default_socket_path() -> Path:
    """Where the broker listens when not told: $PREALLOC_SOCKET, else the runtime path."""
    env = os.environ.get("PREALLOC_SOCKET")
    return Path(env) if env else runtime_socket_path()


def client_socket_path() -> Path:
    """Where a client without a path connects: $PREALLOC_SOCKET, then the root broker's
    socket, then this uid's — the first that exists (the last when none does)."""
    env = os.environ.get("PREALLOC_SOCKET")
    if env:
        return Path(env)  # named by the user: used even when absent (the error says so)
    candidates = [runtime_socket_path(0)]
    if os.geteuid() != 0:
        candidates.append(runtime_socket_path())
    for path in candidates:
        if path.exists():
            return _checked_tmp_socket(path)
    return _checked_tmp_socket(candidates[-1])


def _checked_tmp_socket(path: Path) -> Path:
    """/tmp is everyone's: a /tmp/prealloc-broker-<uid> another user made first could
    hold a fake broker that hands out what it likes. Such a directory is refused."""
    directory = path.parent
    if not directory.name.startswith("prealloc-broker-") or directory.parent != Path("/tmp"):
        return path
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return path
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        raise PermissionError(f"{directory}: not a directory of uid {uid} closed to others "
                              f"(owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
                              "refusing to connect to a broker socket in it")
    return path



__all__ = ["client_socket_path", "default_socket_path", "runtime_socket_path",
           "Closed", "ERROR_TYPES", "MAX_FDS", "MAX_ID", "MAX_MESSAGE", "MAX_PROTOCOL_ERRORS", "OPS",
           "ProtocolError", "RateLimited", "VERSION", "VERSIONS", "VersionError", "WrongResourceType", "allocation_from_json",
           "allocation_to_json", "decode_message", "encode_message", "feedback_from_json", "feedback_to_json",
           "plain", "prediction_from_json", "prediction_to_json", "request_from_json", "request_to_json",
           "statistics_from_json", "statistics_to_json"]
