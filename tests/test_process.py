"""What `garrison up` tells the operator once it listens: where to browse, and where the admin
UI is and who may reach it (so that nobody has to guess the path or the rule)."""

from __future__ import annotations

import socket

import pytest

from garrison.config import validate
from garrison.process import announce


def _lines(capsys: pytest.CaptureFixture[str], data: dict[str, object]) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        announce(sock, None, validate(data))
        port = sock.getsockname()[1]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"garrison: listening on https://127.0.0.1:{port}"
    return out


def test_admin_ui_is_announced_with_who_may_reach_it(capsys: pytest.CaptureFixture[str]) -> None:
    out = _lines(capsys, {})
    assert "trusts the CA above" in out[1]
    assert out[2] == (
        "garrison: admin UI at /.garrison/admin/ for users with role admin "
        "(clients in 127.0.0.0/8, ::1/128)"
    )
    wider = _lines(capsys, {"admin": {"allow": ["10.0.0.0/8"]}})
    assert wider[2].endswith("(clients in 10.0.0.0/8)")
    off = _lines(capsys, {"admin": {"enabled": False}})
    assert not any("admin UI" in line for line in off)
