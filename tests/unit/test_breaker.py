"""The circuit breaker (`gateway/breaker.py`) on a clock the test moves."""

from __future__ import annotations

from gateway.breaker import Breaker
from gateway.providers.base import Provider
from gateway.providers.local import LocalProvider
from gateway.routing import Router


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fail(breaker: Breaker, clock: Clock, times: int, reason: str = "answered 503") -> None:
    for _ in range(times):
        breaker.failure(reason, clock())


def test_a_new_breaker_is_closed() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    assert breaker.allows(clock())
    assert breaker.circuit(clock()) == "closed"


def test_it_opens_after_threshold_failures_in_a_row() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    fail(breaker, clock, 2)
    assert breaker.circuit(clock()) == "closed"
    assert breaker.allows(clock())
    fail(breaker, clock, 1, "answered 502")
    assert breaker.circuit(clock()) == "open"
    assert not breaker.allows(clock())
    assert (breaker.failures, breaker.reason) == (3, "answered 502")  # the last one's


def test_a_success_between_failures_resets_the_count() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    fail(breaker, clock, 2)
    breaker.success()
    fail(breaker, clock, 2)
    assert breaker.circuit(clock()) == "closed"  # never three in a row
    fail(breaker, clock, 1)
    assert breaker.circuit(clock()) == "open"


def test_it_is_half_open_once_the_cooldown_has_passed() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    fail(breaker, clock, 3)
    clock.advance(29.9)
    assert breaker.circuit(clock()) == "open"
    assert not breaker.allows(clock())
    clock.advance(0.1)
    assert breaker.circuit(clock()) == "half-open"
    assert breaker.allows(clock())  # one trial


def test_a_successful_trial_closes_it() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    fail(breaker, clock, 3)
    clock.advance(30)
    breaker.success()
    assert breaker.circuit(clock()) == "closed"
    assert (breaker.failures, breaker.opened_at, breaker.reason) == (0, None, "")
    fail(breaker, clock, 2)  # and it takes the full count again to open
    assert breaker.circuit(clock()) == "closed"


def test_a_failed_trial_opens_it_for_another_full_cooldown() -> None:
    clock = Clock()
    breaker = Breaker(threshold=3, cooldown=30)
    fail(breaker, clock, 3)
    clock.advance(30)
    assert breaker.circuit(clock()) == "half-open"
    fail(breaker, clock, 1)  # one failure is enough: the count was not reset
    assert breaker.circuit(clock()) == "open"
    clock.advance(29)
    assert not breaker.allows(clock())
    clock.advance(1)
    assert breaker.circuit(clock()) == "half-open"


def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    clock = Clock()
    breaker = Breaker(threshold=1, cooldown=5)
    fail(breaker, clock, 1)
    assert breaker.circuit(clock()) == "open"


# -- the router's use of it: an open backend is tried last, and listed as such --------------


def router(clock: Clock) -> Router:
    providers: dict[str, Provider] = {"fluxkrea": LocalProvider(), "segmind": LocalProvider()}
    routes = {"flux-krea": ["fluxkrea", "segmind"]}
    return Router(providers, routes, threshold=3, cooldown=30, clock=clock)


def circuits(r: Router) -> dict[str, tuple[str, str]]:
    return {p["name"]: (p["circuit"], p["reason"]) for p in r.describe() if p["kind"] == "backend"}


def test_the_router_tries_an_open_backend_last_until_its_cooldown_passes() -> None:
    clock = Clock()
    r = router(clock)
    assert r.order("flux-krea") == ["fluxkrea", "segmind"]
    fail(r.breakers["fluxkrea"], clock, 3, "fluxkrea answered 503")
    assert r.order("flux-krea") == ["segmind", "fluxkrea"]  # still a final trial
    circuit, reason = circuits(r)["fluxkrea"]
    assert circuit == "open"
    assert reason == "3 failures in a row, last: fluxkrea answered 503"
    assert circuits(r)["segmind"][0] == "closed"

    clock.advance(30)
    assert r.order("flux-krea") == ["fluxkrea", "segmind"]
    assert circuits(r)["fluxkrea"][0] == "half-open"
    r.breakers["fluxkrea"].success()
    assert circuits(r)["fluxkrea"][0] == "closed"
