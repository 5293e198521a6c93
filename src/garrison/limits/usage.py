"""How many LLM tokens a response used, read from an OpenAI-compatible upstream's own report.

Token budgets are spent from the `usage` object the model server returns; Garrison never counts
tokens itself (it has no tokenizer and would disagree with the server). Two shapes exist:

* a JSON response (`stream: false`) carries `usage` at the top level;
* a streamed response (`text/event-stream`) carries it only when the request asked for
  `stream_options.include_usage`, as a last chunk with `"choices": []` before `data: [DONE]`.

`prepare_request` adds that option when the client left it out (otherwise a streamed request
would be unmetered), and tells the caller to strip the usage-only event again so the client
gets exactly the stream it asked for. `UsageObserver` watches the response while it is relayed:
it never buffers more than one incomplete SSE event (so tokens still reach the client as they
are generated) and never raises, because a malformed upstream body must reach the client as it
is, not turn into a gateway error.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_JSON_BODY = 4 * 1024 * 1024
"""Largest JSON body parsed (request rewritten, response kept for its usage). Beyond it the body
is relayed untouched: parsing would cost memory for a body no chat request or reply needs."""

MAX_COUNT = 10**9
"""Largest token count believed; anything bigger is a broken or hostile number, not usage."""

_USAGE = b'"usage"'
# A blank line ends an SSE event: two line ends in a row, a line end being CRLF, LF or CR.
# A CR right before an LF is one CRLF, never two line ends (the lookahead), else every CRLF
# line would end an event.
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_TRUE_WORDS = frozenset({"1", "on", "t", "true", "y", "yes"})
_NOT_JSON = (b"multipart/", b"application/x-www-form-urlencoded")

_JSON, _SSE, _OTHER = 0, 1, 2


def _media_type(content_type: bytes | None) -> bytes:
    """The lower-case media type of a Content-Type value, parameters dropped."""
    if not content_type:
        return b""
    return content_type.split(b";", 1)[0].strip().lower()


def _is_json_type(media: bytes) -> bool:
    """JSON or a JSON-based type (`application/problem+json`, ...)."""
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _truthy(value: object) -> bool:
    """Whether a lenient server (pydantic in lax mode: vLLM, SGLang, LiteLLM) reads `value` as
    true. `"stream": "true"` or `1` streams there, so reading only the literal `true` would
    let a client stream without usage being requested, i.e. unmetered."""
    if value is True:
        return True
    if type(value) in (int, float):
        return value == 1
    return isinstance(value, str) and value.strip().lower() in _TRUE_WORDS


def _loads(data: bytes) -> Any:
    """json.loads that never raises: None for anything that is not JSON (bad UTF-8, too deep,
    an integer of more digits than Python converts)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def prepare_request(body: bytes, content_type: bytes | None) -> tuple[bytes | None, bool]:
    """Ask the upstream to report the usage of a streamed completion.

    Returns `(new_body, strip_usage)`: `new_body` is None when the body stays as it is;
    `strip_usage` says the client did not ask for the usage event, so the response observer
    must remove it again. Only a JSON object whose `stream` is true and whose
    `stream_options.include_usage` is not `true` is rewritten, every other member kept.

    The Content-Type is deliberately not required to be JSON: some servers (llama.cpp) parse
    the body whatever the header says, so a client could otherwise dodge metering by sending
    `text/plain`. Only form and multipart bodies, which no server reads as JSON, are skipped.
    The body is parsed exactly like FastAPI does (`json.loads` on the bytes, UTF-16/32 and BOM
    detected) and re-serialised, so the upstream sees the document Garrison inspected (one
    `stream` key, even if the client sent duplicates). Never raises.
    """
    media = _media_type(content_type)
    if not body or len(body) > MAX_JSON_BODY or media.startswith(_NOT_JSON):
        return None, False
    doc = _loads(body)
    if not isinstance(doc, dict) or not _truthy(doc.get("stream")):
        return None, False
    options = doc.get("stream_options")
    if not isinstance(options, dict):
        options = {}  # absent, null or garbage: a request for usage replaces it
    asked = options.get("include_usage")
    if asked is True:
        return None, False
    # A lenient "true" is normalised to true (a strict server might ignore it), but the
    # client did ask, so its usage event is kept.
    options["include_usage"] = True
    doc["stream_options"] = options
    try:
        new = json.dumps(doc, separators=(",", ":")).encode("ascii")
    except (ValueError, TypeError, RecursionError):
        return None, False
    return new, not _truthy(asked)


def _count(value: object) -> int | None:
    """A believable token count, or None: a non-negative int (an integral float too), not a
    bool, not beyond MAX_COUNT. A wrong count would corrupt a budget; none just skips it."""
    if type(value) is float and value.is_integer():
        value = int(value)
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    return None


def tokens_of(usage: object) -> int | None:
    """Total tokens of an OpenAI `usage` object: `total_tokens`, else the sum of the valid
    `prompt_tokens` and `completion_tokens`; None when it holds no believable count."""
    if not isinstance(usage, dict):
        return None
    total = _count(usage.get("total_tokens"))
    if total is not None:
        return total
    parts = [_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))]
    known = [part for part in parts if part is not None]
    return sum(known) if known else None


class UsageObserver:
    """Watches one response on its way to the client and learns the tokens it used.

    JSON bodies are relayed at once and a copy (up to MAX_JSON_BODY) is parsed at the end.
    Event streams are cut into events at blank lines; only events that contain `"usage"` are
    parsed (a bytes search, so a long stream costs next to nothing). With `strip_usage_event`,
    complete events are sent on as they complete and the usage-only event Garrison asked for
    is dropped; only an incomplete trailing event is held back, which no SSE client could act
    on before it completes anyway. Any other content type passes through and counts nothing.
    """

    def __init__(self, content_type: bytes | None, strip_usage_event: bool) -> None:
        media = _media_type(content_type)
        if media == b"text/event-stream":
            self._mode = _SSE
        elif _is_json_type(media):
            self._mode = _JSON
        else:
            self._mode = _OTHER
        self._strip = strip_usage_event and self._mode == _SSE
        self._tokens: int | None = None
        self._kept: list[bytes] = []  # JSON: the body so far
        self._kept_size = 0
        self._too_big = False
        self._buf = bytearray()  # SSE: the incomplete trailing event
        self._skip = False  # SSE: the event in _buf outgrew MAX_JSON_BODY; relay, do not parse
        self._after_cr = False  # SSE: the last event ended on a CR; an LF next belongs to it
        self._after_cr_dropped = False  # ... and that event was stripped

    @property
    def tokens(self) -> int | None:
        """Total tokens the response reported, None when it carried no (believable) usage."""
        return self._tokens

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of the body; return the bytes to send to the client now."""
        if not data or self._mode == _OTHER:
            return data
        if self._mode == _JSON:
            if not self._too_big:
                self._kept_size += len(data)
                if self._kept_size > MAX_JSON_BODY:
                    self._too_big = True
                    self._kept.clear()
                else:
                    self._kept.append(bytes(data))
            return data
        out = self._feed_sse(data)
        return out if self._strip else data

    def end(self) -> bytes:
        """The body is over: return what was held back, and read the usage of a JSON body."""
        if self._mode == _JSON:
            if not self._too_big and self._kept:
                doc = _loads(b"".join(self._kept))
                if isinstance(doc, dict):
                    self._learn(doc.get("usage"))
            self._kept.clear()
            return b""
        if self._mode != _SSE or not self._buf:
            return b""
        # An unterminated last event: SSE clients discard it, but its usage was still spent.
        event = bytes(self._buf)
        self._buf.clear()
        keep = True if self._skip else self._event(event)
        self._skip = False
        return event if self._strip and keep else b""

    def _feed_sse(self, data: bytes) -> bytes:
        """Add data to the pending event, handle every event it completes, and return the
        bytes of the kept events (used only when stripping)."""
        out: list[bytes] = []
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":  # the LF of a CRLF split from its CR: part of that event
                if not self._after_cr_dropped:
                    out.append(b"\n")
                data = data[1:]
        buf = self._buf
        # A blank line split across the join starts at most 3 bytes back (CRLF CRLF); the
        # pending bytes before that were searched already, so they are not searched again.
        start = max(0, len(buf) - 3)
        buf += data
        pos = 0
        while (match := _BLANK.search(buf, max(pos, start))) is not None:
            end = match.end()
            event = bytes(buf[pos:end])
            keep = True if self._skip else self._event(event)
            self._skip = False
            if keep and self._strip:
                out.append(event)
            pos = end
            if end == len(buf) and buf[-1] == 0x0D:
                # Ended by a CR at the very end: if an LF comes next, it is this CR's LF.
                self._after_cr = True
                self._after_cr_dropped = not keep
        del buf[:pos]
        if len(buf) > MAX_JSON_BODY:
            # One event this big is no usage report: stop holding it (unbounded memory, and a
            # stalled client) and relay it as it comes, keeping 3 bytes to find its end.
            if self._strip:
                out.append(bytes(buf[:-3]))
            del buf[:-3]
            self._skip = True
        return b"".join(out)

    def _event(self, event: bytes) -> bool:
        """Read one complete event's usage; return False when it is to be stripped."""
        if _USAGE not in event:
            return True
        lines = [line for line in event.splitlines() if line.startswith(b"data:")]
        data = b"\n".join(line[6:] if line[5:6] == b" " else line[5:] for line in lines)
        doc = _loads(data) if data else None
        if not isinstance(doc, dict) or doc.get("usage") is None:
            return True
        self._learn(doc["usage"])
        return not (self._strip and doc.get("choices") == [])

    def _learn(self, usage: object) -> None:
        """The last believable usage wins: some servers repeat the running total per chunk."""
        tokens = tokens_of(usage)
        if tokens is not None:
            self._tokens = tokens
