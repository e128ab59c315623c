"""The one retry policy: only ``Retryable`` errors are tried again."""

from __future__ import annotations

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from dockerlb.errors import Retryable
from dockerlb.settings import Settings


def retrying(settings: Settings, attempts: int | None = None) -> Retrying:
    return Retrying(
        retry=retry_if_exception_type(Retryable),
        wait=wait_exponential(multiplier=settings.retry_initial, max=settings.retry_max),
        stop=stop_after_attempt(attempts or settings.retry_attempts),
        reraise=True,
    )
