"""When to renew, and how long to wait after a failure. Pure functions: easy to test exactly.

Renew at the earliest of: `renew_before` ahead of expiry, two thirds into the lifetime (so a
6-day certificate is renewed with 2 days left, not never), and the window the CA suggests
through ACME Renewal Information (RFC 9773) when it offers one. A revoked certificate, one
for other names or from another CA directory is due now.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509


def renewal_due(
    cert: x509.Certificate, renew_before: float, ari_time: dt.datetime | None = None
) -> dt.datetime:
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    by_margin = not_after - dt.timedelta(seconds=renew_before)
    by_fraction = not_before + (not_after - not_before) * 2 / 3
    due = min(by_margin, by_fraction)
    if ari_time is not None:
        due = min(due, ari_time)
    return due


def backoff(failures: int, minimum: float, maximum: float) -> float:
    """Seconds before retry number `failures` (1, 2, ...): doubling from `minimum`, capped."""
    if failures <= 0:
        return 0.0
    return float(min(maximum, minimum * 2 ** min(failures - 1, 32)))
