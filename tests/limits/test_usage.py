"""Token usage from OpenAI-compatible responses, learnt while the response is relayed unchanged.

The stream tests cut the body at arbitrary byte positions (inside `data:`, inside a CRLF,
inside a UTF-8 character), because the network does: whatever the cuts, the client must get
exactly the upstream's bytes, less only the usage event Garrison asked for itself.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from garrison.limits.usage import MAX_JSON_BODY, UsageObserver, prepare_request, tokens_of

JSON_CT = b"application/json"
SSE_CT = b"text/event-stream; charset=utf-8"


def chat(**members: object) -> str:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **members})


def relay(observer: UsageObserver, body: bytes, cuts: list[int]) -> bytes:
    """Feed `body` in the pieces `cuts` makes, as the network would; return what was sent."""
    out = []
    last = 0
    for cut in [*sorted(cuts), len(body)]:
        out.append(observer.feed(body[last:cut]))
        last = cut
    out.append(observer.end())
    return b"".join(out)


# ---------------------------------------------------------------- prepare_request


def test_stream_without_options_gets_include_usage_and_keeps_the_rest() -> None:
    body = chat(stream=True, temperature=0.5, max_tokens=9, user="ü")
    new, strip = prepare_request(body.encode(), JSON_CT)
    assert strip is True
    assert new is not None
    expected = json.loads(body)
    expected["stream_options"] = {"include_usage": True}
    assert json.loads(new) == expected


def test_existing_stream_options_are_merged() -> None:
    body = chat(stream=True, stream_options={"continuous_usage_stats": True}).encode()
    new, strip = prepare_request(body, JSON_CT)
    assert strip is True and new is not None
    assert json.loads(new)["stream_options"] == {
        "continuous_usage_stats": True,
        "include_usage": True,
    }


@pytest.mark.parametrize("options", [{"include_usage": False}, None, "garbage", []])
def test_include_usage_false_or_broken_options_are_overridden(options: object) -> None:
    new, strip = prepare_request(chat(stream=True, stream_options=options).encode(), None)
    assert strip is True and new is not None
    assert json.loads(new)["stream_options"]["include_usage"] is True


def test_client_that_asked_for_usage_is_left_alone() -> None:
    body = chat(stream=True, stream_options={"include_usage": True}).encode()
    assert prepare_request(body, JSON_CT) == (None, False)


def test_lenient_true_is_normalised_but_the_client_keeps_its_usage_event() -> None:
    body = chat(stream=True, stream_options={"include_usage": "true"}).encode()
    new, strip = prepare_request(body, JSON_CT)
    assert new is not None and json.loads(new)["stream_options"]["include_usage"] is True
    assert strip is False


@pytest.mark.parametrize("stream", ["true", "True", 1, 1.0, "yes", "on"])
def test_stream_values_a_lenient_server_reads_as_true_are_metered(stream: object) -> None:
    """vLLM's pydantic streams on `"stream": "true"`; skipping those would be a bypass."""
    new, strip = prepare_request(chat(stream=stream).encode(), JSON_CT)
    assert strip is True and new is not None


@pytest.mark.parametrize("stream", [False, None, 0, "false", "no", [], {}])
def test_not_streaming_is_unchanged(stream: object) -> None:
    assert prepare_request(chat(stream=stream).encode(), JSON_CT) == (None, False)
    assert prepare_request(chat().encode(), JSON_CT) == (None, False)


def test_duplicate_stream_keys_resolve_like_the_upstream_and_are_collapsed() -> None:
    new, strip = prepare_request(b'{"stream": false, "stream": true}', JSON_CT)
    assert strip is True and new is not None
    assert new.count(b'"stream"') == 1


def test_content_type_is_not_trusted_but_forms_are_skipped() -> None:
    body = chat(stream=True).encode()
    assert prepare_request(body, b"text/plain")[1] is True  # llama.cpp would read it
    assert prepare_request(body, b"application/json; charset=utf-8")[1] is True
    assert prepare_request(body, b"multipart/form-data; boundary=x") == (None, False)
    assert prepare_request(body, b"application/x-www-form-urlencoded") == (None, False)


def test_utf16_json_is_read_as_the_upstream_reads_it() -> None:
    new, strip = prepare_request(chat(stream=True).encode("utf-16"), JSON_CT)
    assert strip is True and new is not None and json.loads(new)["stream"] is True


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"stream"',
        b"null",
        b'{"stream": true',
        b'{"stream": true, "x": "\xff\xfe"}',
        b'{"stream": true, "x": "\xc3"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"stream": true, "n": ' + b"9" * 5000 + b"}",
        b'{"stream": true, "pad": "' + b"x" * MAX_JSON_BODY + b'"}',
    ],
    ids=lambda body: repr(body[:24]),
)
def test_garbage_requests_are_left_alone(body: bytes) -> None:
    assert prepare_request(body, JSON_CT) == (None, False)


@given(st.binary(max_size=200), st.sampled_from([None, JSON_CT, b"text/plain", b""]))
def test_prepare_request_never_raises(body: bytes, ctype: bytes | None) -> None:
    new, strip = prepare_request(body, ctype)
    assert (new is None and strip is False) or isinstance(new, bytes)


# ---------------------------------------------------------------- usage numbers


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": "7"}, 7),
        ({"total_tokens": 12.0}, 12),
        ({"total_tokens": 0}, 0),
        ({"completion_tokens": 5}, 5),
        ({"total_tokens": "7"}, None),
        ({"total_tokens": -7}, None),
        ({"total_tokens": True}, None),
        ({"total_tokens": 7.5}, None),
        ({"total_tokens": 10**9 + 1}, None),
        ({"total_tokens": float("inf")}, None),
        ({"prompt_tokens": False, "completion_tokens": -1}, None),
        ({}, None),
        ([7], None),
        ("7", None),
        (7, None),
    ],
)
def test_tokens_of(usage: object, tokens: int | None) -> None:
    assert tokens_of(usage) == tokens


# ---------------------------------------------------------------- JSON responses


def completion_body(usage: object = None, pad: int = 0) -> bytes:
    doc: dict[str, object] = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "é" * pad}}],
    }
    if usage is not None:
        doc["usage"] = usage
    return json.dumps(doc, ensure_ascii=False).encode()


@given(
    st.integers(0, 10**9),
    st.integers(0, 300),
    st.lists(st.integers(0, 10_000), max_size=12),
    st.booleans(),
)
def test_json_response_split_anywhere(total: int, pad: int, cuts: list[int], strip: bool) -> None:
    body = completion_body({"prompt_tokens": 1, "total_tokens": total}, pad)
    cuts = [cut % (len(body) + 1) for cut in cuts]
    observer = UsageObserver(b"application/json; charset=utf-8", strip)
    assert relay(observer, body, cuts) == body
    assert observer.tokens == total


def test_json_response_without_usage_or_not_json() -> None:
    for body in [completion_body(), b"{not json", b"[]", b'{"usage": null}', b""]:
        observer = UsageObserver(JSON_CT, False)
        assert relay(observer, body, [len(body) // 2]) == body
        assert observer.tokens is None


def test_huge_json_body_is_relayed_but_not_kept() -> None:
    body = completion_body({"total_tokens": 9}, pad=5 * 1024 * 1024 // 2)
    assert len(body) > MAX_JSON_BODY
    observer = UsageObserver(JSON_CT, False)
    cuts = list(range(0, len(body), 64 * 1024))
    assert relay(observer, body, cuts) == body
    assert observer.tokens is None


@pytest.mark.parametrize("ctype", [None, b"", b"text/html", b"text/plain", b"image/png"])
@pytest.mark.parametrize("strip", [False, True])
def test_other_content_types_pass_through(ctype: bytes | None, strip: bool) -> None:
    body = completion_body({"total_tokens": 9}) + b"\n\ndata: " + completion_body() + b"\n\n"
    observer = UsageObserver(ctype, strip)
    assert relay(observer, body, [3, 50, 51]) == body
    assert observer.tokens is None


# ---------------------------------------------------------------- event streams


def event(doc: object, eol: str) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}{eol}{eol}"


def content_chunk(text: str, usage: object = None) -> dict[str, object]:
    chunk: dict[str, object] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def usage_chunk(usage: object) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def stream(texts: list[str], total: int, eol: str) -> tuple[bytes, bytes]:
    """(the upstream's stream, the same stream without its usage-only event)."""
    head = "".join(event(content_chunk(text), eol) for text in texts)
    usage = event(
        usage_chunk({"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": total}), eol
    )
    done = f"data: [DONE]{eol}{eol}"
    return (head + usage + done).encode(), (head + done).encode()


EOLS = st.sampled_from(["\n", "\r\n", "\r"])
TEXTS = st.lists(st.text(max_size=20), max_size=6)
CUTS = st.lists(st.integers(0, 100_000), max_size=20)


@settings(max_examples=300)
@given(TEXTS, st.integers(0, 10**9), EOLS, CUTS)
def test_stream_strip_removes_exactly_the_usage_event(
    texts: list[str], total: int, eol: str, cuts: list[int]
) -> None:
    upstream, client = stream(texts, total, eol)
    cuts = [cut % (len(upstream) + 1) for cut in cuts]
    observer = UsageObserver(SSE_CT, True)
    assert relay(observer, upstream, cuts) == client
    assert observer.tokens == total


@settings(max_examples=300)
@given(TEXTS, st.integers(0, 10**9), EOLS, CUTS)
def test_stream_without_strip_is_byte_for_byte(
    texts: list[str], total: int, eol: str, cuts: list[int]
) -> None:
    upstream, _ = stream(texts, total, eol)
    cuts = [cut % (len(upstream) + 1) for cut in cuts]
    observer = UsageObserver(SSE_CT, False)
    sent = []
    last = 0
    for cut in [*sorted(cuts), len(upstream)]:
        piece = upstream[last:cut]
        assert observer.feed(piece) == piece  # sent on at once, not held back
        sent.append(piece)
        last = cut
    assert observer.end() == b""
    assert b"".join(sent) == upstream
    assert observer.tokens == total


def test_stripping_holds_back_only_the_incomplete_event() -> None:
    observer = UsageObserver(SSE_CT, True)
    first = event(content_chunk("a"), "\n").encode()
    assert observer.feed(first + b"data: {") == first
    assert observer.feed(b'"x": 1}\n') == b""
    assert observer.feed(b"\n") == b'data: {"x": 1}\n\n'
    # A usage-only event split anywhere is never sent, not even in part.
    usage = event(usage_chunk({"total_tokens": 5}), "\r\n").encode()
    assert [observer.feed(usage[i : i + 1]) for i in range(len(usage))] == [b""] * len(usage)
    assert observer.tokens == 5
    assert observer.feed(b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"


def test_a_cr_ended_event_is_sent_at_once_and_its_split_lf_follows_it() -> None:
    observer = UsageObserver(SSE_CT, True)
    assert observer.feed(b"data: 1\r\n\r") == b"data: 1\r\n\r"  # no wait for the next chunk
    assert observer.feed(b"\ndata: 2\r\r") == b"\ndata: 2\r\r"
    assert observer.feed(b"data: 3\r\r") == b"data: 3\r\r"
    usage = event(usage_chunk({"total_tokens": 4}), "\r\n").encode()
    assert observer.feed(usage[:-1]) == b""
    assert observer.feed(usage[-1:] + b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert observer.tokens == 4


def test_client_that_asked_gets_its_usage_event() -> None:
    upstream, _ = stream(["a", "b"], 11, "\n")
    observer = UsageObserver(SSE_CT, False)
    assert relay(observer, upstream, [7, 100]) == upstream
    assert observer.tokens == 11


def test_last_usage_wins_and_chunks_with_choices_are_never_stripped() -> None:
    """vLLM's continuous_usage_stats puts a running total in every chunk."""
    body = "".join(
        [
            event(content_chunk("a", {"total_tokens": 3}), "\n"),
            event(content_chunk("b", {"total_tokens": 4}), "\n"),
            event(usage_chunk({"total_tokens": 9}), "\n"),
            event(content_chunk("c", {"total_tokens": "garbage"}), "\n"),
            "data: [DONE]\n\n",
        ]
    ).encode()
    observer = UsageObserver(SSE_CT, True)
    out = relay(observer, body, [10, 200])
    assert observer.tokens == 9  # the later chunk's usage is not believable, so ignored
    assert out == body.replace(event(usage_chunk({"total_tokens": 9}), "\n").encode(), b"")
    assert out.count(b'"usage"') == 3


GARBAGE = [  # (event, whether it is a usage-only event, stripped though its numbers are bad)
    ('data: {"usage": {"total_tokens": 5}, "choices": [\n\n', False),  # invalid JSON
    ('data: {"choices": [], "usage": {"total_tokens": "5"}}\n\n', True),
    ('data: {"choices": [], "usage": {"total_tokens": -5, "prompt_tokens": true}}\n\n', True),
    ('data: {"choices": [], "usage": {"total_tokens": 5.5}}\n\n', True),
    ('data: {"choices": [], "usage": 5}\n\n', True),
    ('data: ["usage", {"total_tokens": 5}]\n\n', False),
    ('data: "usage"\n\n', False),
    (': "usage" in a comment\n\n', False),
    ('event: usage\ndata: {"choices": [], "usage": null}\n\n', False),
    ('data: {"choices": [], "usage": {"total_tokens": 5}]]]\n\n', False),
    ('data: \xff\xfe\x00 "usage"\n\n', False),
    ('data: {"choices": [], "usage": {"total_tokens": ' + "9" * 5000 + "}}\n\n", False),
    ('data: {"choices": [], "usage": ' + "[" * 50_000 + "]" * 50_000 + "}\n\n", False),
]


@pytest.mark.parametrize(("garbage", "usage_only"), GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("strip", [False, True])
def test_garbage_events_are_relayed_and_ignored(
    garbage: str, usage_only: bool, strip: bool
) -> None:
    body = (event(content_chunk("a"), "\n") + garbage + "data: [DONE]\n\n").encode("utf-8")
    observer = UsageObserver(SSE_CT, strip)
    out = relay(observer, body, [5, 60, 61, 120])
    assert observer.tokens is None
    if strip and usage_only:
        assert out == body.replace(garbage.encode(), b"")
    else:
        assert out == body


def test_multi_line_data_and_other_fields_are_read() -> None:
    body = (
        b"id: 7\nevent: message\n"
        b'data: {"choices": [],\ndata:"usage": {"total_tokens": 13}}\n\n'
        b"data: [DONE]\n\n"
    )
    observer = UsageObserver(SSE_CT, True)
    assert relay(observer, body, [1, 30]) == b"data: [DONE]\n\n"
    assert observer.tokens == 13


def test_unterminated_last_event_is_flushed_and_counted() -> None:
    body = (
        event(content_chunk("a"), "\n").encode()
        + b'data: {"choices":[{}],"usage":{"total_tokens":2}}'
    )
    observer = UsageObserver(SSE_CT, True)
    assert relay(observer, body, [4]) == body
    assert observer.tokens == 2


@pytest.mark.parametrize("strip", [False, True])
def test_huge_event_is_relayed_without_being_held(strip: bool) -> None:
    big = (
        b'data: {"choices": [], "usage": {"total_tokens": 5}, "pad": "'
        + b"x" * (5 * 1024 * 1024)
        + b'"}\n\n'
    )
    body = big + b'data: {"choices": [], "usage": {"total_tokens": 8}}\n\ndata: [DONE]\n\n'
    observer = UsageObserver(SSE_CT, strip)
    out = []
    held = 0
    for start in range(0, len(body), 256 * 1024):
        piece = body[start : start + 256 * 1024]
        sent = observer.feed(piece)
        out.append(sent)
        held += len(piece) - len(sent)
        assert held <= MAX_JSON_BODY + 256 * 1024  # never the whole huge event
    out.append(observer.end())
    assert observer.tokens == 8
    if strip:
        assert b"".join(out) == big + b"data: [DONE]\n\n"
    else:
        assert b"".join(out) == body


@given(st.binary(max_size=300), CUTS, st.booleans(), st.sampled_from([SSE_CT, JSON_CT]))
def test_observer_never_raises_and_loses_nothing_without_strip(
    body: bytes, cuts: list[int], strip: bool, ctype: bytes
) -> None:
    cuts = [cut % (len(body) + 1) for cut in cuts]
    observer = UsageObserver(ctype, strip)
    out = relay(observer, body, cuts)
    if not strip or b'"usage"' not in body:
        assert out == body


@pytest.mark.parametrize("strip", [False, True])
def test_cost_is_linear_in_tiny_pieces(strip: bool) -> None:
    """A long event arriving in tiny pieces is not searched again from its start each time
    (that would be quadratic: 1 MB in 10-byte pieces is 10**11 byte steps)."""
    big = b'data: {"pad": "' + b"x" * 1_000_000 + b'"}\n\n'
    body = big + event(usage_chunk({"total_tokens": 6}), "\n").encode()
    observer = UsageObserver(SSE_CT, strip)
    out = b"".join(observer.feed(body[i : i + 10]) for i in range(0, len(body), 10))
    assert out + observer.end() == (big if strip else body)
    assert observer.tokens == 6
