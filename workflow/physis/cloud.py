"""Retrying calls to cloud services: bounded attempts, exponential back-off, ``Retry-After``.

Cloud SDKs differ in what they retry on their own: msrest, under the Azure Custom Vision SDK,
allows POST retries through ``Retry.method_whitelist``, a name urllib3 2 no longer reads, so no
POST is ever retried. A ``service`` plugin therefore wraps each call in :func:`call_with_retries`
and tells it, per exception, whether the failure is transient and how long the server asked it
to wait. The helper knows nothing about any one SDK.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Transient:
    """A failure worth retrying: a short reason for the log and the server's ``Retry-After``."""

    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` extra attempts after the first; waits double from ``base_s`` up to ``cap_s``."""

    retries: int = 5
    base_s: float = 1.0
    cap_s: float = 60.0

    def delay(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based).

        The server's ``Retry-After`` wins over the back-off schedule (it knows its own rate
        window), but both are capped so that a bogus header cannot stall a job for hours.
        """
        wanted = retry_after_s if retry_after_s is not None else self.base_s * 2 ** (attempt - 1)
        return min(max(wanted, 0.0), self.cap_s)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None or not value.strip():
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - (now or datetime.now(timezone.utc))).total_seconds(), 0.0)


def call_with_retries(call: Callable[[], T], policy: RetryPolicy, transient: Callable[[Exception], Transient | None],
                      what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``call``; on an exception that ``transient`` accepts, wait and try again.

    Non-transient exceptions, and the last transient one once ``policy.retries`` are spent,
    propagate unchanged so that the caller can turn them into its own error message.
    """
    attempt = 1
    while True:
        try:
            return call()
        except Exception as err:
            verdict = transient(err)
            if verdict is None or attempt > policy.retries:
                raise
            wait = policy.delay(attempt, verdict.retry_after_s)
            log.warning("%s: %s; retry %d/%d in %.2f s", what, verdict.reason, attempt, policy.retries, wait)
            sleep(wait)
            attempt += 1
