"""Quotas: limits on what predictions may take, checked before anything is allocated.

Three kinds, all in the resource type's unit:
  per_request      the most one request may ask for
  per_type         the most all live allocations of a type may hold together
  per_application  the most the live allocations for one target application may hold,
                   per type
A request over any of them ends FAILED with a reason naming the quota.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from .types import ResourceType, check_amount


class QuotaExceeded(Exception):
    pass


@dataclass
class Quotas:
    per_request: dict[ResourceType, float] = field(default_factory=dict)
    per_type: dict[ResourceType, float] = field(default_factory=dict)
    per_application: dict[str, dict[ResourceType, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.per_request = {ResourceType.parse(t): check_amount(f"per_request[{t}]", v)
                            for t, v in self.per_request.items()}
        self.per_type = {ResourceType.parse(t): check_amount(f"per_type[{t}]", v)
                         for t, v in self.per_type.items()}
        self.per_application = {
            app: {ResourceType.parse(t): check_amount(f"per_application[{app}][{t}]", v)
                  for t, v in limits.items()}
            for app, limits in self.per_application.items()
        }


class QuotaLedger:
    """What live allocations hold, by type and by (application, type); the one owner of
    that accounting. charge() checks every quota and books the amount atomically."""

    def __init__(self, quotas: Quotas | None = None) -> None:
        self.quotas = quotas or Quotas()
        self._lock = threading.Lock()
        self._by_type: defaultdict[ResourceType, float] = defaultdict(float)
        self._by_app: defaultdict[tuple[str, ResourceType], float] = defaultdict(float)

    def charge(self, resource_type: ResourceType, application: str | None, amount: float,
               *, request_amount: float | None = None) -> None:
        """Books amount or raises QuotaExceeded (booking nothing). request_amount is the
        whole allocation's size checked against per_request (the amount itself when
        None; an adjust books the growth but checks the new size)."""
        q = self.quotas
        limit = q.per_request.get(resource_type, math.inf)
        size = amount if request_amount is None else request_amount
        if size > limit:
            raise QuotaExceeded(f"quota: a {resource_type.name} allocation may hold at most {limit:g}, "
                                f"not {size:g}")
        with self._lock:
            limit = q.per_type.get(resource_type, math.inf)
            if self._by_type[resource_type] + amount > limit:
                raise QuotaExceeded(f"quota: {resource_type.name} allocations may hold at most {limit:g}"
                                    f" together; {self._by_type[resource_type]:g} held, {amount:g} asked")
            if application is not None:
                limit = q.per_application.get(application, {}).get(resource_type, math.inf)
                held = self._by_app[(application, resource_type)]
                if held + amount > limit:
                    raise QuotaExceeded(f"quota: {application!r} may hold at most {limit:g} of "
                                        f"{resource_type.name}; {held:g} held, {amount:g} asked")
                self._by_app[(application, resource_type)] = held + amount
            self._by_type[resource_type] += amount

    def force(self, resource_type: ResourceType, application: str | None, amount: float) -> None:
        """Books amount without checking: what a strategy reserved beyond the request
        (whole cores for a fraction) is held all the same."""
        with self._lock:
            self._by_type[resource_type] += amount
            if application is not None:
                self._by_app[(application, resource_type)] += amount

    def refund(self, resource_type: ResourceType, application: str | None, amount: float) -> None:
        with self._lock:
            self._by_type[resource_type] = max(0.0, self._by_type[resource_type] - amount)
            if application is not None:
                key = (application, resource_type)
                remaining = self._by_app[key] - amount
                if remaining <= 1e-9:
                    self._by_app.pop(key, None)
                else:
                    self._by_app[key] = remaining

    def held(self, resource_type: ResourceType, application: str | None = None) -> float:
        with self._lock:
            if application is None:
                return self._by_type.get(resource_type, 0.0)
            return self._by_app.get((application, resource_type), 0.0)

    def clear(self) -> None:
        with self._lock:
            self._by_type.clear()
            self._by_app.clear()
