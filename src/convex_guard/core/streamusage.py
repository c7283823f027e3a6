"""Usage read from a server-sent event stream, sans-IO: the caller feeds each body chunk.

The shape read is OpenAI's `stream_options.include_usage`: chunks whose `choices[].delta`
carry the text, then one event `{"choices": [], "usage": {"prompt_tokens": …,
"completion_tokens": …, "total_tokens": …}}` and `data: [DONE]`. Events may be split
anywhere across chunks, lines may end in CRLF, LF or CR, comments and other fields are
skipped (the WHATWG event-stream rules). Memory is bounded: the part of a line not yet
ended, and one event's data up to `MAX_EVENT_BYTES`; a longer event is counted, not kept.

A stream that ends without its usage event (the client went away, or the upstream was not
asked for it) still says what it sent: `estimated_completion_tokens`, the characters of the
text deltas (and of events too long to read) at `CHARS_PER_TOKEN` characters a token.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass

#: One event's data kept for parsing; usage events are a few hundred bytes, and a longer
#: event (a long text delta, a tool call's arguments) is only counted.
MAX_EVENT_BYTES = 64 * 1024
#: The estimate's ratio: about four characters a token, the usual rule of thumb for English
#: text with OpenAI's tokenizers. An estimate, used only when the stream says nothing.
CHARS_PER_TOKEN = 4
#: The largest count believed (the request log's `report_usage` bound).
MAX_TOKENS = 10**12
MAX_MODEL_LENGTH = 256

_DONE = b"[DONE]"
_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


@dataclass(frozen=True, slots=True)
class StreamUsage:
    """The numbers of a stream's usage event; a field the event left out is None."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


class UsageReader:
    """Reads one response stream: `feed` each body chunk, in order, as it is sent.

    After the stream: `usage` (the last valid usage event, None if none came), `model`
    (the first chunk's), `done` (`[DONE]` arrived), `chunks` (events of the OpenAI shape),
    `problem` (why a usage event was ignored, for the log) and `estimated_completion_tokens`
    (see the module's docstring).
    """

    __slots__ = (
        "_cr",
        "_data",
        "_data_size",
        "_line",
        "_line_size",
        "_skipping",
        "chunks",
        "done",
        "model",
        "problem",
        "text_chars",
        "tokens_seen",
        "usage",
    )

    def __init__(self) -> None:
        self._line = bytearray()  # the line not ended yet (at most MAX_EVENT_BYTES of it)
        self._line_size = 0  # its full length, kept or not
        self._skipping = False  # the line outgrew the cap: the rest of it is only counted
        self._cr = False  # the last chunk ended with CR: a LF opening the next one ends nothing
        self._data: list[bytes] = []
        self._data_size = -1  # -1: the event has no data line yet
        self.usage: StreamUsage | None = None
        self.model: str | None = None
        self.done = False
        self.problem: str | None = None
        self.text_chars = 0
        #: Chunks of the OpenAI shape read so far (events with a `choices` list).
        self.chunks = 0
        #: Events that carried generated output so far (text, a tool call, a refusal).
        self.tokens_seen = 0

    @property
    def estimated_completion_tokens(self) -> int:
        """The completion tokens the text sent amounts to, at `CHARS_PER_TOKEN` a token."""
        return math.ceil(self.text_chars / CHARS_PER_TOKEN)

    def feed(self, chunk: bytes) -> bool:
        """Read the next body chunk; true when it carried the stream's first output."""
        before = self.tokens_seen
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if not chunk:
            return False
        if b"\r" in chunk:
            self._cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        rest = lines.pop()  # what follows the last line end: the start of the next line
        for line in lines:
            if self._line_size or len(line) > MAX_EVENT_BYTES:
                self._part(line, True)
            else:
                self._line_ended(line)
        if rest:
            self._part(rest, False)
        return before == 0 and self.tokens_seen > 0

    def _part(self, part: bytes, ended: bool) -> None:
        """A piece of a line held across chunks, or too long to keep: `ended` ends the line."""
        size = self._line_size + len(part)
        held = self._line
        if not self._skipping and size <= MAX_EVENT_BYTES:
            held += part
            self._line_size = size
            if ended:
                line = bytes(held)
                held.clear()
                self._line_size = 0
                self._line_ended(line)
            return
        if not self._skipping:  # too long: only whether it is a data line is kept
            self._skipping = True
            data = (held + part[:5]).startswith(b"data:")
            held.clear()
            if data:
                held += b"data"
        self._line_size = size
        if ended:
            if held:
                self._oversized(size - 5)
            held.clear()
            self._line_size, self._skipping = 0, False

    def _line_ended(self, line: bytes) -> None:
        if not line:  # a blank line dispatches the event
            self._dispatch()
            return
        if line[0] == 0x3A:  # ":" a comment
            return
        colon = line.find(b":")
        if colon == -1:
            name, value = line, b""
        else:
            name, value = line[:colon], line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if name != b"data":
            return
        if self._data_size == -2:  # the rest of an event too long to keep
            self.text_chars += len(value)
            return
        if self._data_size == -1:
            self._data_size = 0
        else:
            self._data_size += 1  # the newline joining data lines
        self._data_size += len(value)
        if self._data_size > MAX_EVENT_BYTES:
            self._oversized(self._data_size)
            return
        self._data.append(value)

    def _oversized(self, size: int) -> None:
        """An event too long to keep: counted as output, its bytes as text for the estimate."""
        if self._data_size != -2:
            self.tokens_seen += 1
        self.text_chars += size
        self._data = []
        self._data_size = -2  # the event's data is gone: skip it until it ends

    def _dispatch(self) -> None:
        data, size = self._data, self._data_size
        self._data, self._data_size = [], -1
        if size < 0:
            return  # no data, or an event too long that was counted already
        payload = data[0] if len(data) == 1 else b"\n".join(data)
        if payload == _DONE:
            self.done = True
            return
        try:
            event = json.loads(payload)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the
            return  # decoder's depth: not an event this reader knows
        if isinstance(event, dict):
            self._read(event)

    def _read(self, event: dict[str, object]) -> None:
        model = event.get("model")
        if (
            self.model is None
            and isinstance(model, str)
            and 0 < len(model) <= MAX_MODEL_LENGTH
            and model.isprintable()
        ):
            self.model = model
        choices = event.get("choices")
        if isinstance(choices, list):
            self.chunks += 1
            output = False
            for choice in choices:
                if isinstance(choice, dict) and self._read_choice(choice):
                    output = True
            if output:
                self.tokens_seen += 1
        usage = event.get("usage")
        if usage is not None:
            self._read_usage(usage)

    def _read_choice(self, choice: dict[str, object]) -> bool:
        """Whether the choice carries output; its text counts toward the estimate."""
        text = choice.get("text")  # the legacy completions stream
        output = False
        if isinstance(text, str) and text:
            self.text_chars += len(text)
            output = True
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for name, value in delta.items():
                if name == "role" or not value:
                    continue
                output = True
                if isinstance(value, str):  # content, refusal, reasoning text
                    self.text_chars += len(value)
                elif name == "tool_calls" and isinstance(value, list):
                    self.text_chars += _arguments_chars(value)
        return output

    def _read_usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            self.problem = f"usage is a {type(usage).__name__}, not an object"
            return
        counts: list[int | None] = []
        for name in _USAGE_FIELDS:
            value = usage.get(name)
            if value is None:
                counts.append(None)
                continue
            count = _count(value)
            if count is None:
                self.problem = f"usage.{name} is not a token count from 0 to {MAX_TOKENS:,}"
                return
            counts.append(count)
        prompt, completion, total = counts
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        if prompt is None and completion is None and total is None:
            self.problem = "usage has no token counts"
            return
        self.usage = StreamUsage(prompt, completion, total)


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
    return number if 0 <= number <= MAX_TOKENS else None


def _arguments_chars(calls: list[object]) -> int:
    total = 0
    for call in calls:
        if isinstance(call, dict):
            function = call.get("function")
            if isinstance(function, dict):
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    total += len(arguments)
    return total


__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_EVENT_BYTES",
    "StreamUsage",
    "UsageReader",
]
