"""`garrison check` validates like `nginx -t`; `garrison up` refuses a broken config the same way.

Both run as real subprocesses (`python -m garrison`), as an operator would run them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GOOD = """
[server]
listen = "127.0.0.1:0"
max_body = "10MiB"
hostnames = ["ai.example.test", "10.0.0.5"]

[server.timeouts]
header_read = "5s"

[[upstream]]
name = "app"
url = "http://127.0.0.1:7860"

[[route]]
path = "/"
upstream = "app"
deny = ["/gradio_api/file="]
"""

BROKEN = """
[server]
listen = "nowhere"
max_body = "lots"
colour = "blue"

[server.timeouts]
header_read = "5 minutes"

[[upstream]]
name = "app"
url = "https://127.0.0.1:7860"

[[route]]
path = "api"
upstream = "app"
"""

# every problem in BROKEN, each as `path.to.key: reason`
BROKEN_PATHS = {
    "server.listen",
    "server.max_body",
    "server.colour",
    "server.timeouts.header_read",
    "upstream.0.url",
    "route.0.path",
}

UNKNOWN_UPSTREAM = """
[[upstream]]
name = "app"
url = "http://127.0.0.1:7860"

[[route]]
path = "/"
upstream = "x"
"""


def garrison(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "garrison", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problem_lines(stderr: str) -> list[str]:
    """The `path: reason` lines (without the closing summary line `up` adds)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("configuration is invalid")
    ]


def test_check_good_config(tmp_path: Path) -> None:
    result = garrison("check", "--config", str(write(tmp_path, "good.toml", GOOD)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "config OK"
    assert result.stderr == ""


def test_check_broken_config_lists_every_error(tmp_path: Path) -> None:
    result = garrison("check", "--config", str(write(tmp_path, "broken.toml", BROKEN)))
    assert result.returncode == 1
    assert "config OK" not in result.stdout
    lines = problem_lines(result.stderr)
    paths = {line.split(": ", 1)[0] for line in lines}
    assert paths == BROKEN_PATHS, result.stderr
    assert len(lines) == len(BROKEN_PATHS), result.stderr
    assert all(": " in line and line.split(": ", 1)[1] for line in lines)
    assert "server.colour: unknown option" in lines
    assert "Traceback" not in result.stderr


def test_check_unknown_upstream(tmp_path: Path) -> None:
    result = garrison("check", "--config", str(write(tmp_path, "ref.toml", UNKNOWN_UPSTREAM)))
    assert result.returncode == 1
    assert problem_lines(result.stderr) == ["route.0.upstream: unknown upstream 'x'"]


def test_check_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = write(tmp_path, "syntax.toml", "[server\nlisten = 1\n")
    result = garrison("check", "--config", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith(f"{bad}: TOML syntax error"), result.stderr
    missing = tmp_path / "missing.toml"
    result = garrison("check", "--config", str(missing))
    assert result.returncode == 1
    assert problem_lines(result.stderr) == [f"{missing}: file not found"]


def test_check_needs_a_config() -> None:
    result = garrison("check")
    assert result.returncode == 2  # click usage error
    assert "--config" in result.stderr


@pytest.mark.e2e
def test_up_refuses_a_broken_config_with_the_same_messages(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.toml", BROKEN)
    checked = garrison("check", "--config", str(path))
    data_dir = tmp_path / "data"
    started = garrison("up", "--config", str(path), "--data-dir", str(data_dir))
    assert started.returncode == 1
    assert "ready" not in started.stdout and "listening" not in started.stdout
    assert problem_lines(started.stderr) == problem_lines(checked.stderr)
    assert "nothing was started" in started.stderr
    # refused before anything was created: no CA, no certificate
    assert not (data_dir / "ca").exists() and not (data_dir / "tls").exists()


@pytest.mark.e2e
def test_up_refuses_an_unknown_upstream(tmp_path: Path) -> None:
    path = write(tmp_path, "ref.toml", UNKNOWN_UPSTREAM)
    started = garrison("up", "--config", str(path), "--data-dir", str(tmp_path / "data"))
    assert started.returncode == 1
    assert problem_lines(started.stderr) == ["route.0.upstream: unknown upstream 'x'"]
