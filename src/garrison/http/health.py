"""Upstream health: up, down, or not known yet; from real traffic, and a probe while idle.

Passive first: every connection the proxy opens to an upstream for a request says "up", every
connect that fails says "down" (with the reason). An upstream that got no new connection for
PROBE_AFTER seconds gets one TCP connect from the gateway's periodic task (closed at once),
so the admin overview and `garrison_upstream_up` never show a state older than that. A TCP
connect, not an HTTP request: it is exactly what the proxy needs from the upstream, and a
health URL would be a guess about an app Garrison does not change (docs/decisions.md,
"Upstream health"). Keep-alive requests on open connections cost nothing here.

State is per process and per upstream (name, host, port), kept across reloads: a reload
builds new pools, and an unchanged upstream keeps what was known about it.
"""

from __future__ import annotations

import logging
import time

from garrison.observe import metrics

log = logging.getLogger("garrison")

PROBE_AFTER = 30.0  # seconds without a new connection before the idle probe
MAX_UPSTREAMS = 1024  # distinct (name, host, port) kept; configs are far smaller


class UpstreamHealth:
    """What the last connection attempt to one upstream said."""

    __slots__ = ("checked", "name", "probing", "reason", "since", "up")

    def __init__(self, name: str) -> None:
        self.name = name
        self.up: bool | None = None  # None: no connection attempted yet
        self.since = 0.0  # wall-clock time of the last change
        self.checked = 0.0  # monotonic time of the last attempt (0: never)
        self.reason = ""  # why the last attempt failed
        self.probing = False

    def ok(self) -> None:
        """A connection to the upstream was made."""
        self.checked = time.monotonic()
        if self.up is True:
            return
        if self.up is False:
            log.warning("upstream %r is up again", self.name)
        self._change(True, "")

    def failed(self, reason: str) -> None:
        """A connection to the upstream could not be made: `reason` says why."""
        self.checked = time.monotonic()
        if self.up is False and reason == self.reason:
            return
        if self.up is not False:
            log.warning("upstream %r is down: %s", self.name, reason)
        self._change(False, reason)

    def stale(self, now: float) -> bool:
        """Whether the idle probe should try (nothing tried for PROBE_AFTER, none running)."""
        return not self.probing and now - self.checked >= PROBE_AFTER

    def value(self) -> float:
        """The gauge's value: 1 up, 0 down (unknown is no sample at all)."""
        return 1.0 if self.up else 0.0

    def _change(self, up: bool, reason: str) -> None:
        first = self.up is None
        self.up, self.reason, self.since = up, reason, time.time()
        if first:  # the series appears with the first answer: absent means "not known yet"
            metrics.track_upstream_health(self.name, self.value)


_known: dict[tuple[str, str, int], UpstreamHealth] = {}


def of(name: str, host: str, port: int) -> UpstreamHealth:
    """The health record of an upstream, the same one across reloads."""
    key = (name, host, port)
    found = _known.get(key)
    if found is None:
        found = UpstreamHealth(name)
        if len(_known) < MAX_UPSTREAMS:
            _known[key] = found
    return found
