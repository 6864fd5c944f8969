"""Per-key limits on a clock the test moves: rate buckets, debt, in-flight bounds, sharing among routers."""

import pytest

from serve_app.domain.errors import RateLimitedError
from serve_app.domain.quotas import KeyLimits, KeyQuotas


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quotas(**limits) -> tuple[KeyQuotas, Clock]:
    clock = Clock()
    return KeyQuotas(KeyLimits(**limits), clock=clock), clock


def test_a_key_spends_its_burst_then_waits_for_the_refill_it_is_told():
    book, clock = quotas(cost_per_minute=60, burst_cost=30)  # refills 1 megapixel-step per second
    for _ in range(3):
        book.admit("a", 10).release()
    with pytest.raises(RateLimitedError) as err:
        book.admit("a", 10)
    assert err.value.status_code == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.retry_after_s == 10 and "60 megapixel-steps per minute" in err.value.message
    clock.now += 9
    with pytest.raises(RateLimitedError):
        book.admit("a", 10)
    clock.now += 1
    book.admit("a", 10).release()


def test_one_key_spending_everything_leaves_every_other_key_its_whole_allowance():
    book, _ = quotas(cost_per_minute=60, burst_cost=30, max_in_flight_requests=2)
    held = [book.admit("greedy", 10), book.admit("greedy", 10)]
    for _ in range(50):
        with pytest.raises(RateLimitedError):
            book.admit("greedy", 10)
    held += [book.admit("patient", 10), book.admit("patient", 10)]
    assert book.in_flight("patient") == (2, 20.0)
    for admission in held:
        admission.release()


def test_costs_are_weighted_so_large_requests_use_the_allowance_faster():
    book, _ = quotas(cost_per_minute=600, burst_cost=100)
    book.admit("small", 1).release()
    for _ in range(99):
        book.admit("small", 1).release()  # a hundred small requests fit the burst
    book.admit("large", 100).release()
    with pytest.raises(RateLimitedError):
        book.admit("large", 1)  # one large request spent the same


def test_a_request_larger_than_the_bucket_runs_from_a_full_one_and_leaves_a_debt():
    book, clock = quotas(cost_per_minute=60, burst_cost=10)
    book.admit("a", 25).release()  # never refused forever
    with pytest.raises(RateLimitedError) as err:
        book.admit("a", 1)
    assert err.value.retry_after_s == 16  # 15 of debt, then 1 to spend
    clock.now += 16
    book.admit("a", 1).release()


def test_in_flight_cost_bounds_a_key_but_never_refuses_a_lone_request():
    book, _ = quotas(max_in_flight_cost=50)
    lone = book.admit("a", 80)  # over the bound, but nothing else in flight
    with pytest.raises(RateLimitedError, match="80.0 megapixel-steps in flight"):
        book.admit("a", 1)
    lone.release()
    first = book.admit("a", 30)
    with pytest.raises(RateLimitedError) as err:
        book.admit("a", 30)
    assert err.value.retry_after_s == 2
    second = book.admit("a", 20)
    assert book.in_flight("a") == (2, 50.0)
    first.release()
    second.release()
    second.release()  # releasing twice gives back once
    assert book.in_flight("a") == (0, 0.0)


def test_in_flight_requests_are_counted_per_key():
    book, _ = quotas(max_in_flight_requests=1)
    held = book.admit("a", 1)
    with pytest.raises(RateLimitedError, match="1 requests in flight"):
        book.admit("a", 1)
    book.admit("b", 1).release()
    held.release()
    book.admit("a", 1).release()


def test_callers_without_a_key_and_configs_without_limits_are_not_limited():
    book, _ = quotas(cost_per_minute=1, burst_cost=1, max_in_flight_requests=1)
    held = [book.admit(None, 1000) for _ in range(10)]
    assert all(a.quotas is None for a in held)
    unlimited, _ = quotas()
    for _ in range(100):
        unlimited.admit("a", 1000)


def test_router_replicas_each_enforce_their_share_of_the_limits():
    limits = KeyLimits(cost_per_minute=120, burst_cost=40, max_in_flight_cost=30, max_in_flight_requests=5)
    share = limits.share(4)
    assert (share.cost_per_minute, share.burst_cost, share.max_in_flight_cost) == (30, 10, 7.5)
    assert share.max_in_flight_requests == 1  # never below one
    assert limits.share(1) is limits
