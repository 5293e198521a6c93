"""The HTTP-01 challenge table: token -> key authorization, shared through the data dir.

A directory rather than a dict in memory, because the responder and the client are often not
the same process: `garrison acme renew` runs while `garrison up` owns port 80, and with
`--workers N` any worker may receive Pebble's or Let's Encrypt's validation request. Each entry
is written atomically, so a responder sees a whole key authorization or none.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from garrison.fsutil import atomic_write, ensure_private_dir

PREFIX = "/.well-known/acme-challenge/"
# RFC 8555 §8.3: the token is base64url; anything else is refused before touching the disk,
# which also makes path traversal impossible.
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,256}")


class ChallengeStore:
    """Tokens being validated right now, as files named after the token."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / "acme" / "challenges"

    def put(self, token: str, key_authorization: str) -> None:
        if not TOKEN_RE.fullmatch(token):
            raise ValueError(f"ACME server sent an invalid challenge token {token!r}")
        ensure_private_dir(self.directory)
        # Not a secret (the CA fetches it over plain HTTP), but only this user's processes
        # need to read it: 0600 in a 0700 directory, like everything under the data dir.
        atomic_write(self.directory / token, key_authorization.encode("ascii"), 0o600)

    def remove(self, token: str) -> None:
        if TOKEN_RE.fullmatch(token):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / token).unlink()

    def get(self, token: str) -> bytes | None:
        """The key authorization for `token`, or None (unknown, malformed, or unreadable)."""
        if not TOKEN_RE.fullmatch(token):
            return None
        try:
            return (self.directory / token).read_bytes()
        except OSError:
            return None

    def answer(self, path: bytes) -> bytes | None:
        """The body for a request path under /.well-known/acme-challenge/, or None (404)."""
        try:
            text = path.split(b"?", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text.startswith(PREFIX):
            return None
        return self.get(text[len(PREFIX) :])
