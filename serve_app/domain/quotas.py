"""Per-key limits: how much GPU work one API key may ask for, so that one caller cannot crowd out the rest.

A request's weight is its planned cost in megapixel-steps (``GenerateRequest.cost``: output megapixels x
steps x n x (1 + input images)), the same measure as ``serving.limits.max_request_cost``: a 2048x2048
request at 50 steps weighs 200 times a 1024x1024 one at 1 step, as it occupies a GPU about that long.

Two limits, each optional, each answered with ``RateLimitedError`` (429 and Retry-After):

- **rate**: a token bucket per key, refilled at ``cost_per_minute / 60`` per second and holding at most
  ``burst_cost``. A request larger than the whole bucket is let through from a full bucket and leaves it
  in debt, so no request is refused forever, and the key then waits for what it overspent.
- **in flight**: the cost (and count) of a key's requests admitted and not yet answered. A request is let
  through when the key has nothing in flight, however large, so the bound never refuses a lone request.

No Ray here: the router holds one ``KeyQuotas`` and calls ``admit`` before it dispatches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from serve_app.domain.errors import RateLimitedError


class KeyLimits(BaseModel):
    """The per-key limits one router replica enforces (the configured ones divided among router replicas)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cost_per_minute: float | None = Field(default=None, gt=0, description="Megapixel-steps a key may start per minute.")
    burst_cost: float | None = Field(default=None, gt=0, description="Megapixel-steps a key may start at once.")
    max_in_flight_cost: float | None = Field(default=None, gt=0,
                                             description="Megapixel-steps a key may have admitted and unanswered.")
    max_in_flight_requests: int | None = Field(default=None, ge=1,
                                               description="Requests a key may have admitted and unanswered.")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After when the in-flight bound refuses.")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.cost_per_minute, self.max_in_flight_cost, self.max_in_flight_requests))

    def share(self, routers: int) -> KeyLimits:
        """This replica's part when ``routers`` router replicas share the traffic (Serve's proxies spread
        requests across them), so that the limits hold for the whole service."""
        if routers <= 1:
            return self

        def part(value):
            return None if value is None else value / routers

        return self.model_copy(update={
            "cost_per_minute": part(self.cost_per_minute), "burst_cost": part(self.burst_cost),
            "max_in_flight_cost": part(self.max_in_flight_cost),
            "max_in_flight_requests": None if self.max_in_flight_requests is None
            else max(1, self.max_in_flight_requests // routers)})


@dataclass
class _KeyState:
    tokens: float
    refilled_at: float
    in_flight_cost: float = 0.0
    in_flight_requests: int = 0


@dataclass
class Admission:
    """A request let through; ``release()`` (once, when it is answered) gives back its in-flight share."""

    quotas: KeyQuotas | None
    key_id: str | None
    cost: float
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released or self.quotas is None:
            return
        self._released = True
        self.quotas._release(self.key_id, self.cost)


class KeyQuotas:
    """The state of every key's limits in one router replica.

    Args:
        limits: this replica's limits (``KeyLimits.share`` of the configured ones).
        clock: seconds, monotonic; tests pass their own.
    """

    def __init__(self, limits: KeyLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.rate_per_s = limits.cost_per_minute / 60 if limits.cost_per_minute else None
        # Without a stated burst, a key may start one minute's worth at once.
        self.capacity = limits.burst_cost or limits.cost_per_minute
        self._keys: dict[str, _KeyState] = {}

    def admit(self, key_id: str | None, cost: float) -> Admission:
        """Let a request of ``cost`` through for ``key_id``, or raise RateLimitedError saying which limit and
        when to retry. Callers without a key id (handle calls inside the cluster, an open endpoint) are
        not limited per key."""
        if key_id is None or not self.limits.active:
            return Admission(None, key_id, cost)
        state = self._state(key_id)
        self._check_in_flight(state, cost)
        if self.rate_per_s is not None:
            needed = min(cost, self.capacity)  # more than the bucket holds: wait until it is full
            if state.tokens < needed:
                wait_s = math.ceil((needed - state.tokens) / self.rate_per_s)
                raise RateLimitedError(
                    f"this key's rate limit: {self.limits.cost_per_minute:g} megapixel-steps per minute; this request "
                    f"costs {cost:.1f}; retry in {wait_s} s", retry_after_s=max(1, wait_s))
            state.tokens -= cost
        state.in_flight_cost += cost
        state.in_flight_requests += 1
        return Admission(self, key_id, cost)

    def charge(self, key_id: str | None, cost: float) -> None:
        """Take ``cost`` from ``key_id``'s bucket after the fact (work a request caused that admission could not
        know, as a LoRA load); the bucket may go into debt, which the key's next requests wait out."""
        if key_id is None or self.rate_per_s is None or cost <= 0:
            return
        self._state(key_id).tokens -= cost

    def in_flight(self, key_id: str) -> tuple[int, float]:
        state = self._keys.get(key_id)
        return (state.in_flight_requests, state.in_flight_cost) if state else (0, 0.0)

    def _check_in_flight(self, state: _KeyState, cost: float) -> None:
        if state.in_flight_requests == 0:
            return
        limits = self.limits
        if limits.max_in_flight_requests is not None and state.in_flight_requests >= limits.max_in_flight_requests:
            raise RateLimitedError(
                f"this key already has {state.in_flight_requests} requests in flight, its limit; retry when one "
                "is answered", retry_after_s=limits.retry_after_s)
        if limits.max_in_flight_cost is not None and state.in_flight_cost + cost > limits.max_in_flight_cost:
            raise RateLimitedError(
                f"this key has {state.in_flight_cost:.1f} megapixel-steps in flight; this request's {cost:.1f} "
                f"would pass its limit of {limits.max_in_flight_cost:g}; retry when one is answered",
                retry_after_s=limits.retry_after_s)

    def _state(self, key_id: str) -> _KeyState:
        now = self.clock()
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState(tokens=self.capacity or 0.0, refilled_at=now)
        elif self.rate_per_s is not None:
            state.tokens = min(self.capacity, state.tokens + (now - state.refilled_at) * self.rate_per_s)
            state.refilled_at = now
        return state

    def _release(self, key_id: str, cost: float) -> None:
        state = self._keys[key_id]
        state.in_flight_cost = max(0.0, state.in_flight_cost - cost)
        state.in_flight_requests -= 1
