"""The sans-IO stream usage reader: any chunking, line ends, comments, long and bad events."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convex_guard.core.streamusage import (
    MAX_EVENT_BYTES,
    StreamUsage,
    UsageReader,
)


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def chunk(text: str) -> bytes:
    return event({"model": "gpt-x", "choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
WORDS = ["Hello", " there", ", ", "how", " are", " you", "?"]
STREAM = (
    b": keep-alive comment\n\n"
    + event({"model": "gpt-x", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    + b"".join(chunk(w) for w in WORDS)
    + b"event: ignored\nid: 7\nretry: 100\n\n"
    + event({"model": "gpt-x", "choices": [], "usage": USAGE})
    + b"data: [DONE]\n\n"
)


def read(chunks: list[bytes]) -> tuple[UsageReader, list[int]]:
    """The reader after `chunks`, and the indexes of the chunks it said carried first output."""
    reader = UsageReader()
    firsts = [i for i, part in enumerate(chunks) if reader.feed(part)]
    return reader, firsts


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def check_whole_stream(reader: UsageReader) -> None:
    assert reader.usage == StreamUsage(11, 7, 18)
    assert reader.model == "gpt-x"
    assert reader.done
    assert reader.problem is None
    assert reader.text_chars == sum(len(w) for w in WORDS)
    assert reader.tokens_seen == len(WORDS)  # the role-only chunk is not output


def test_one_chunk_and_byte_by_byte_read_alike() -> None:
    whole, firsts = read([STREAM])
    check_whole_stream(whole)
    assert firsts == [0]
    bytewise, firsts = read([STREAM[i : i + 1] for i in range(len(STREAM))])
    check_whole_stream(bytewise)
    # The first output is the chunk that ends the first content event.
    first_content_end = STREAM.index(chunk(WORDS[0])) + len(chunk(WORDS[0])) - 1
    assert firsts == [first_content_end]


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    ending=st.sampled_from([b"\n", b"\r\n", b"\r"]),
)
def test_any_chunking_and_any_line_end_read_the_same_usage(cuts: list[int], ending: bytes) -> None:
    data = STREAM.replace(b"\n", ending)
    reader, firsts = read(split_at(data, cuts))
    check_whole_stream(reader)
    assert len(firsts) == 1


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    data = STREAM.replace(b"\n", b"\r\n")
    cut = data.index(b"\r\n") + 1  # between the CR and its LF
    reader, _ = read([data[:cut], data[cut:]])
    check_whole_stream(reader)


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=12))
def test_an_event_too_long_to_keep_is_counted_and_the_usage_still_read(cuts: list[int]) -> None:
    long_text = "x" * (3 * MAX_EVENT_BYTES)
    data = chunk("hi") + chunk(long_text) + event({"choices": [], "usage": USAGE})
    reader, _ = read(split_at(data, cuts))
    assert reader.usage == StreamUsage(11, 7, 18)
    assert reader.tokens_seen == 2
    # The long event's bytes (its JSON, not only its text) go to the estimate.
    assert len(long_text) <= reader.text_chars - 2 <= len(chunk(long_text))
    # Bounded memory: nothing near the long event's size is held.
    assert len(reader._line) <= MAX_EVENT_BYTES and not reader._data


def test_multi_line_data_is_joined() -> None:
    payload = json.dumps({"choices": [], "usage": USAGE}, indent=1).encode()
    data = b"".join(b"data:" + line + b"\n" for line in payload.split(b"\n")) + b"\n"
    reader, _ = read([data])
    assert reader.usage == StreamUsage(11, 7, 18)


@pytest.mark.parametrize(
    ("usage", "problem"),
    [
        ({"prompt_tokens": -1, "completion_tokens": 2}, "usage.prompt_tokens"),
        ({"total_tokens": 1.5}, "usage.total_tokens"),
        ({"total_tokens": True}, "usage.total_tokens"),
        ({"total_tokens": 10**13}, "usage.total_tokens"),
        ({"total_tokens": "12"}, "usage.total_tokens"),
        ({}, "no token counts"),
        ([1, 2], "not an object"),
    ],
)
def test_a_bad_usage_event_is_ignored_with_its_reason(usage: object, problem: str) -> None:
    reader, _ = read([chunk("four"), event({"choices": [], "usage": usage}), b"data: [DONE]\n\n"])
    assert reader.usage is None
    assert reader.problem is not None and problem in reader.problem
    assert reader.estimated_completion_tokens == 1  # four characters: one token


def test_partial_usage_and_a_later_valid_event_win() -> None:
    reader, _ = read(
        [event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})]
    )
    assert reader.usage == StreamUsage(3, 4, 7)
    reader.feed(event({"choices": [], "usage": {"total_tokens": 9}}))
    assert reader.usage == StreamUsage(None, None, 9)


def test_without_a_usage_event_the_text_sent_is_estimated() -> None:
    reader, _ = read([chunk("a" * 10), chunk("b" * 5), b"data: not json\n\n", b"data: [1]\n\n"])
    assert reader.usage is None and not reader.done and reader.problem is None
    assert reader.estimated_completion_tokens == 4  # 15 characters at four a token


def test_tool_calls_and_legacy_text_are_output() -> None:
    call = {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a": 1}'}}]}
    reader, firsts = read(
        [event({"choices": [{"delta": call}]}), event({"choices": [{"text": "hey"}]})]
    )
    assert firsts == [0] and reader.tokens_seen == 2
    assert reader.text_chars == len('{"a": 1}') + 3


def test_the_bounds_are_report_usages() -> None:
    from convex_guard.core import streamusage
    from convex_guard.middleware import logger

    assert streamusage.MAX_TOKENS == logger.MAX_TOKENS
    assert streamusage.MAX_MODEL_LENGTH == logger.MAX_MODEL_LENGTH


def test_json_nested_past_the_decoders_depth_is_skipped() -> None:
    deep = b"data: " + b"[" * (MAX_EVENT_BYTES - 10) + b"\n\n"
    reader, _ = read([deep, event({"choices": [], "usage": USAGE})])
    assert reader.usage == StreamUsage(11, 7, 18)
