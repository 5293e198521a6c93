"""The gateway's background renewal: wake when due, renew in a thread, swap the certificate.

The ACME client is synchronous (requests) and an order takes seconds, so each attempt runs in
a worker thread; the event loop keeps serving, including the HTTP-01 answers the attempt needs.
Failures are handled (and backed off) by AcmeManager; this loop only decides when to wake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from garrison.acme.manager import AcmeManager, Outcome

log = logging.getLogger("garrison")
MAX_SLEEP = 3600.0  # re-check at least hourly: the clock, ARI and other processes move on
MIN_SLEEP = 1.0


async def attempt(manager: AcmeManager, *, force: bool = False, source: str = "renewal") -> Outcome:
    """One attempt in a thread; an unexpected error becomes a failed Outcome, never a crash."""
    try:
        return await asyncio.to_thread(manager.ensure, force=force, source=source)
    except Exception as exc:
        log.error("ACME %s failed unexpectedly: %s", source, exc)
        retry = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=manager.config.retry_min)
        return Outcome(False, error=str(exc), next_check=retry)


async def renew_forever(manager: AcmeManager, on_outcome: Callable[[Outcome], None]) -> None:
    """Until cancelled: sleep until the next renewal is due (asking the CA's renewal
    information first), attempt it, report each attempt to `on_outcome`."""
    while True:
        try:
            await asyncio.to_thread(manager.check_ari)
            due = await asyncio.to_thread(manager.due)
        except Exception as exc:
            log.error("ACME renewal schedule unreadable: %s", exc)
            due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=manager.config.retry_min)
        wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
        if wait > 0:
            await asyncio.sleep(min(MAX_SLEEP, max(MIN_SLEEP, wait)))
            continue
        outcome = await attempt(manager)
        if outcome.renewed or outcome.error:
            on_outcome(outcome)
        if outcome.renewed:
            # A certificate due again at once (renew_before longer than its lifetime) must
            # not turn into a loop of orders: at most one per retry_min.
            await asyncio.sleep(manager.config.retry_min)
        elif not outcome.error:
            await asyncio.sleep(MIN_SLEEP)  # someone else renewed: re-read the schedule
