"""A circuit breaker per backend: taken out after failures in a row, tried again later.

A backend that fails `threshold` times in a row is taken out for `cooldown` seconds (its
circuit opens), then given one trial (half-open): a success closes the circuit, a failure
opens it again for another cool-down. The caller passes the time (`now`), so the breaker
keeps no clock of its own.

The breaker is per process on purpose: each process sees its own failures at once, and
a shared breaker would add a Redis round trip to every upstream call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Circuit = Literal["closed", "open", "half-open"]


@dataclass
class Breaker:
    threshold: int
    cooldown: float
    failures: int = 0  # in a row: a success resets the count
    opened_at: float | None = None
    reason: str = ""  # the last failure's

    def allows(self, now: float) -> bool:
        """Closed, or open for `cooldown` seconds already (half-open: worth a trial)."""
        return self.opened_at is None or now - self.opened_at >= self.cooldown

    def circuit(self, now: float) -> Circuit:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.allows(now) else "open"

    def success(self) -> None:
        self.failures, self.opened_at, self.reason = 0, None, ""

    def failure(self, reason: str, now: float) -> None:
        self.failures += 1
        self.reason = reason
        if self.failures >= self.threshold:
            self.opened_at = now  # (re)open: a failed half-open trial restarts the cool-down
