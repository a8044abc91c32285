"""The webhook dispatcher's retry schedule (pure: no services)."""

from __future__ import annotations

import pytest

from shared.fetch import FetchPolicy
from shared.webhooks import Dispatcher, Outcome

pytestmark = pytest.mark.unit

# the contract's Webhooks section: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h
CONTRACT_S = [5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]


def _dispatcher(schedule: list[float]) -> Dispatcher:
    return Dispatcher(sessions=None, policy=FetchPolicy(), schedule_s=tuple(schedule))  # type: ignore[arg-type]


def test_default_settings_carry_the_contracts_schedule():
    from shared.settings import Settings

    assert Settings().webhook_retry_schedule_s == CONTRACT_S


def test_each_retry_waits_its_step_with_ten_percent_jitter_then_the_delivery_is_spent():
    dispatcher = _dispatcher(CONTRACT_S)
    for attempts, step in enumerate(CONTRACT_S, start=1):
        delays = [dispatcher.next_delay(attempts) for _ in range(200)]
        assert all(d is not None and 0.9 * step <= d <= 1.1 * step for d in delays)
        assert len({round(d, 6) for d in delays if d is not None}) > 1  # jittered, not fixed
    assert dispatcher.next_delay(len(CONTRACT_S) + 1) is None  # 10 attempts in all, then failed


def test_outcomes_success_permanent_and_retryable():
    assert Outcome(204, None).ok and Outcome(299, None).ok
    assert not Outcome(301, "HTTP 301").ok and not Outcome(None, "timeout").ok
    assert Outcome(410, "HTTP 410", permanent=True).permanent
