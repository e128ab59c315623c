"""The one retry policy: only ``Retryable`` errors are tried again."""

from __future__ import annotations

import functools
import threading

from tenacity import (
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_when_event_set,
    wait_exponential,
)

from dockerlb.errors import Retryable
from dockerlb.settings import Settings


def retrying(settings: Settings, until: threading.Event | None = None) -> Retrying:
    """Exponential backoff from the settings. By default ``retry_attempts``
    tries; with ``until``, tries until that event is set (and sleeps on it, so
    setting it cuts a wait short)."""
    retry = retry_if_exception_type(Retryable)
    wait = wait_exponential(multiplier=settings.retry_initial, max=settings.retry_max)
    if until is None:
        attempts = stop_after_attempt(settings.retry_attempts)
        return Retrying(retry=retry, wait=wait, reraise=True, stop=attempts)
    return Retrying(
        retry=retry,
        wait=wait,
        reraise=True,
        stop=stop_when_event_set(until),
        sleep=functools.partial(_sleep_on, until),
    )


def _sleep_on(event: threading.Event, seconds: float) -> None:
    event.wait(seconds)
