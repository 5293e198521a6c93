"""Start the bundled demo app as a child process for `garrison up --demo`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys


class DemoProcess:
    """The demo app on a loopback ephemeral port; stopped with the gateway."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "garrison.demo", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop it in order
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the demo app did not start: {line.strip() or 'no output'}")
        self.url = match.group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
