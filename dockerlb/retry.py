"""The one retry policy: only ``Retryable`` errors are tried again."""

from __future__ import annotations

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
    ends = {"stop": stop_after_attempt(settings.retry_attempts)}
    if until is not None:
        ends = {"stop": stop_when_event_set(until), "sleep": until.wait}
    return Retrying(
        retry=retry_if_exception_type(Retryable),
        wait=wait_exponential(multiplier=settings.retry_initial, max=settings.retry_max),
        reraise=True,
        **ends,
    )
