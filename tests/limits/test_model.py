"""Parsing rate and token budget texts: what users write in the config, the CLI and the admin
API. A bad text is a ValueError with the reason (shown as a config or CLI error), never
another exception that would surface as a traceback."""

from __future__ import annotations

import pytest

from garrison.config import ConfigError, validate
from garrison.limits.model import MAX_AMOUNT, Budget, Rate, check_overrides


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [
        ("10/minute", 10, 60.0),
        (" 5 / seconds ", 5, 1.0),
        ("100/5m", 100, 300.0),
        ("1e3/hour", 1000, 3600.0),
        ("2/366d", 2, 366 * 86400.0),
        (f"{MAX_AMOUNT}/day", MAX_AMOUNT, 86400.0),
    ],
)
def test_valid_rates(text: str, limit: int, period: float) -> None:
    rate = Rate.parse(text)
    assert (rate.limit, rate.period) == (limit, period)
    assert rate.step == period / limit


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1e999/day", "whole number from 1"),  # infinity: was an OverflowError
        (f"{MAX_AMOUNT + 1}/day", "whole number from 1"),
        ("0/minute", "whole number from 1"),
        ("1.5/minute", "whole number from 1"),
        ("1/0s", "period must be from 1 second"),  # a zero window: was accepted
        ("1/367d", "period must be from 1 second"),
        ("10/fortnight", "unknown period"),
        ("ten per minute", "use N/second"),
    ],
)
def test_invalid_rates_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Rate.parse(text)
    with pytest.raises(ValueError, match=reason):
        Budget.parse(text)
    with pytest.raises(ValueError, match=reason):
        check_overrides([text], None)


def test_config_refuses_a_bad_rate_with_its_place() -> None:
    base = {
        "upstream": [{"name": "app", "url": "http://127.0.0.1:9"}],
        "route": [{"path": "/", "upstream": "app", "rate": ["1e999/day"]}],
    }
    with pytest.raises(ConfigError, match=r"route.*rate.*whole number"):
        validate(base)
