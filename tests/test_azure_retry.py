"""physis.cloud: the back-off helper every service plugin's calls go through (no network)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from physis.cloud import RetryPolicy, Transient, call_with_retries, parse_retry_after


class Throttled(Exception):
    pass


def flaky(failures: list[Exception], result: str = "ok"):
    """A call that raises the given exceptions in turn, then returns ``result``."""
    def call():
        if failures:
            raise failures.pop(0)
        return result
    return call


def throttled_only(err: Exception) -> Transient | None:
    return Transient("throttled", getattr(err, "retry_after", None)) if isinstance(err, Throttled) else None


@pytest.mark.parametrize("value, seconds", [("7", 7.0), (" 2 ", 2.0), ("0", 0.0), ("-3", 0.0), ("1.5", 1.5),
                                            ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
                                            ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
                                            (None, None), ("", None), ("soon", None)])
def test_parse_retry_after(value, seconds):
    now = datetime(2015, 10, 21, 7, 28, tzinfo=timezone.utc)
    assert parse_retry_after(value, now=now) == seconds


def test_delay_prefers_retry_after_and_caps_everything():
    policy = RetryPolicy(retries=5, base_s=1.0, cap_s=10.0)
    assert [policy.delay(attempt, None) for attempt in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert policy.delay(1, 3.0) == 3.0 and policy.delay(4, 0.0) == 0.0
    assert policy.delay(1, 3600.0) == 10.0


def test_transient_errors_are_retried_with_the_servers_wait():
    waits = []
    first = Throttled()
    first.retry_after = 2.5
    result = call_with_retries(flaky([first, Throttled()]), RetryPolicy(retries=3, base_s=0.5), throttled_only,
                               "op", sleep=waits.append)
    assert result == "ok" and waits == [2.5, 1.0]  # Retry-After, then the back-off schedule


def test_retries_are_bounded_and_the_last_error_propagates(caplog):
    waits = []
    errors = [Throttled("1"), Throttled("2"), Throttled("3")]
    with pytest.raises(Throttled, match="3"):
        call_with_retries(flaky(errors), RetryPolicy(retries=2, base_s=0.1), throttled_only, "upload",
                          sleep=waits.append)
    assert len(waits) == 2 and "upload: throttled; retry 2/2" in caplog.text


def test_other_errors_are_not_retried():
    waits = []
    with pytest.raises(KeyError):
        call_with_retries(flaky([KeyError("x")]), RetryPolicy(), throttled_only, "op", sleep=waits.append)
    assert waits == []
