"""The example gateway's AI side, shared by the FastAPI, Django and Flask examples.

Request validation (pydantic), a deterministic local responder so the demo works offline, and
an optional OpenAI-compatible upstream (`GATEWAY_UPSTREAM_URL`, `GATEWAY_UPSTREAM_API_KEY`).

The local responder also streams (`local_chat_stream`): word by word, as server-sent events in
OpenAI's chunk shape, ending with the usage event when asked (`stream_options.include_usage`)
and `data: [DONE]`. `relay` passes a stream on to the client, chunk by chunk.

Token counts from the local responder are an approximation: a token is a run of word
characters or a single punctuation mark (`\\w+|[^\\w\\s]`), which is close to, but not the same
as, a BPE tokenizer's count. Costs use an illustrative price per million tokens per provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from convex_guard.core.streamusage import StreamUsage, UsageReader

PROVIDERS = ("openai", "openrouter", "groq", "perplexity", "ollama", "lmstudio")
#: Illustrative USD prices per million tokens, for the request log's cost column.
PRICE_PER_MILLION = {
    "openai": 0.60,
    "openrouter": 0.50,
    "groq": 0.10,
    "perplexity": 1.00,
    "ollama": 0.0,
    "lmstudio": 0.0,
}
EMBEDDING_MODEL = "local-embedding-64"
EMBEDDING_DIMENSIONS = 64
DEFAULT_UPSTREAM_TIMEOUT = 30.0
#: The most tokens one answer is believed to use (what `report_usage` accepts); a larger,
#: negative, fractional or missing count from an upstream is logged as unknown.
MAX_TOKENS = 10**12
#: Seconds between the local responder's streamed words: slow enough to watch in a terminal.
STREAM_DELAY = 0.02
EVENT_STREAM = "text/event-stream"
_TOKEN = re.compile(r"\w+|[^\w\s]")

logger = logging.getLogger(__name__)


def _printable(value: str) -> str:
    # A model name goes into the request log, which takes printable names only.
    if not value.isprintable():
        raise ValueError("must hold printable characters only")
    return value


ModelName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=32_000)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The OpenAI chat-completions body, the fields the gateway needs (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: ModelName
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    #: Only `POST /v1/chat/completions` streams; the per-provider route ignores both.
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def upstream_body(self, *, stream: bool) -> dict[str, Any]:
        """What is forwarded: a stream always asks for its usage (the request log reads it)."""
        body = self.model_dump(exclude={"stream", "stream_options"})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName = EMBEDDING_MODEL
    input: str | Annotated[list[Annotated[str, Field(max_length=8_000)]], Field(max_length=256)]

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class BadRequest(Exception):
    """The body is not valid JSON, or not the expected shape: a 400/422 problem."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []


def parse(model: type[ChatRequest] | type[EmbeddingRequest], body: bytes) -> Any:
    """Validate a raw body: malformed JSON → 400, wrong shape → 422 (never a 500)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(error["type"] == "json_invalid" for error in errors):
            raise BadRequest(400, "The body is not valid JSON.") from None
        clean = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
        raise BadRequest(422, "The body does not match the expected schema.", clean) from None


def problem_body(status: int, title: str, detail: str, **extra: Any) -> dict[str, Any]:
    return {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}


def count_tokens(text: str) -> int:
    """Approximate tokens: word runs and single punctuation marks."""
    return len(_TOKEN.findall(text))


def cost(provider: str, tokens: int | None) -> float | None:
    """The call's illustrative price; unknown (None) when its tokens are."""
    if tokens is None:
        return None
    return round(PRICE_PER_MILLION.get(provider, 0.0) * tokens / 1_000_000, 8)


@dataclass(frozen=True)
class Reply:
    body: dict[str, Any]
    model: str
    #: None when an upstream did not say, or said something that cannot be a token count.
    tokens: int | None


def local_chat(provider: str, request: ChatRequest) -> Reply:
    """A deterministic answer: the same request always gets the same text and counts."""
    last = request.messages[-1].content
    digest = hashlib.sha256(f"{provider}\0{request.model}\0{last}".encode()).hexdigest()
    words = len(_TOKEN.findall(last))
    text = (
        f"Local responder ({provider}/{request.model}): you sent {len(request.messages)} "
        f"message(s); the last one has about {words} tokens. Digest {digest[:12]}."
    )
    prompt = sum(count_tokens(m.content) for m in request.messages)
    completion = count_tokens(text)
    return Reply(
        _completion(digest, request.model, text, prompt, completion),
        request.model,
        prompt + completion,
    )


async def local_chat_stream(
    provider: str, request: ChatRequest, *, include_usage: bool, delay: float | None = None
) -> AsyncIterator[bytes]:
    """`local_chat`'s answer streamed word by word, in OpenAI's chunk shape: a first chunk
    with the role, one per word, one with `finish_reason`, then (when `include_usage`) the
    usage event (`choices: []`), and `data: [DONE]`. `delay`: seconds between words
    (default `STREAM_DELAY`)."""
    pause = STREAM_DELAY if delay is None else delay
    reply = local_chat(provider, request)
    body = reply.body
    text: str = body["choices"][0]["message"]["content"]
    base = {
        "id": body["id"],
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body["model"],
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def event(choices: list[dict[str, Any]], **more: Any) -> bytes:
        return b"data: " + json.dumps({**base, "choices": choices, **more}).encode() + b"\n\n"

    def delta(content: dict[str, str], finish: str | None = None) -> bytes:
        return event([{"index": 0, "delta": content, "finish_reason": finish}], **extra)

    yield delta({"role": "assistant", "content": ""})
    words = text.split(" ")
    for i, word in enumerate(words):
        await asyncio.sleep(pause)
        yield delta({"content": word if i == len(words) - 1 else word + " "})
    yield delta({}, "stop")
    if include_usage:
        yield event([], usage=body["usage"])
    yield b"data: [DONE]\n\n"


async def relay(
    chunks: AsyncIterator[bytes],
    *,
    keep_usage: bool,
    on_usage: Callable[[StreamUsage], None],
) -> AsyncIterator[bytes]:
    """Pass a stream that carries its usage event on to the client, chunk by chunk, as it
    comes; `on_usage` gets the usage at the end. With `keep_usage=False` (the client did not
    ask for it) the usage event is taken out, the rest still passed on as each event ends."""
    reader = UsageReader()
    if keep_usage:
        async for chunk in chunks:
            yield chunk
            reader.feed(chunk)
    else:
        pending = b""
        async for chunk in chunks:
            pending = (pending + chunk).replace(b"\r\n", b"\n")
            *events, pending = pending.split(b"\n\n")
            out = [e + b"\n\n" for e in events if not _usage_event(e, reader)]
            if out:
                yield b"".join(out)
        if pending:
            yield pending
    if reader.usage is not None:
        on_usage(reader.usage)


def _usage_event(event: bytes, reader: UsageReader) -> bool:
    """Whether `event` is the stream's usage event (`choices: []` and a usage), read if so."""
    if b'"usage"' not in event:
        return False
    data = b"\n".join(line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError):
        return False
    if not (isinstance(parsed, dict) and parsed.get("choices") == [] and parsed.get("usage")):
        return False
    reader.feed(event + b"\n\n")
    return True


def _completion(digest: str, model: str, text: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{digest[:24]}",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def embed(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector derived from SHA-256 of the text (not semantic)."""
    raw = b""
    counter = 0
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(counter.to_bytes(4, "big") + text.encode()).digest()
        counter += 1
    values = [(v / 2**31) - 1.0 for v in struct.unpack(f">{dimensions}I", raw[: dimensions * 4])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def local_embeddings(request: EmbeddingRequest) -> Reply:
    inputs = request.inputs()
    tokens = sum(count_tokens(text) for text in inputs)
    body = {
        "object": "list",
        "model": request.model,
        "data": [
            {"object": "embedding", "index": i, "embedding": embed(text)}
            for i, text in enumerate(inputs)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Reply(body, request.model, tokens)


# -- the optional upstream ----------------------------------------------------------------------


class UpstreamError(Exception):
    """The upstream failed or answered nonsense: a 502 problem (no upstream detail leaked)."""


@dataclass(frozen=True)
class Upstream:
    """An OpenAI-compatible API (`…/v1`), configured by environment."""

    url: str
    api_key: str | None
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT

    def __repr__(self) -> str:
        return f"Upstream(url={self.url!r}, api_key={'***' if self.api_key else None})"

    @classmethod
    def from_env(cls) -> Upstream | None:
        url = os.environ.get("GATEWAY_UPSTREAM_URL")
        if not url:
            return None
        timeout = float(os.environ.get("GATEWAY_UPSTREAM_TIMEOUT", DEFAULT_UPSTREAM_TIMEOUT))
        return cls(url.rstrip("/"), os.environ.get("GATEWAY_UPSTREAM_API_KEY") or None, timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _reply(self, response: httpx.Response, fallback_model: str) -> Reply:
        if response.status_code >= 400:
            raise UpstreamError(f"upstream answered HTTP {response.status_code}")
        try:
            # NaN, Infinity and 1e999 are not JSON numbers; they become null, so the body can
            # be passed on (a JSON response refuses them) and no such number is believed.
            body = json.loads(
                response.content, parse_constant=_no_number, parse_float=_finite_or_none
            )
        except ValueError:  # also UnicodeDecodeError, and an int literal of 4,300+ digits
            raise UpstreamError("upstream answered with a body that is not JSON") from None
        if not isinstance(body, dict):
            raise UpstreamError("upstream answered with an unexpected body")
        usage = body.get("usage")
        tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
        if tokens is None:
            logger.info("Upstream %s: no usage.total_tokens; tokens logged as unknown", self.url)
        elif type(tokens) is not int or not 0 <= tokens <= MAX_TOKENS:  # a bool is no count
            logger.warning(
                "Upstream %s: usage.total_tokens is not a token count; logged as unknown", self.url
            )
            tokens = None
        model = body.get("model")
        if not (isinstance(model, str) and 0 < len(model) <= 200 and model.isprintable()):
            model = fallback_model
        return Reply(body, model, tokens)

    async def chat(self, client: httpx.AsyncClient, request: ChatRequest) -> Reply:
        try:
            response = await client.post(
                f"{self.url}/chat/completions",
                json=request.upstream_body(stream=False),
                headers=self.headers(),
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        return self._reply(response, request.model)

    async def chat_stream(
        self, client: httpx.AsyncClient, request: ChatRequest
    ) -> AsyncIterator[bytes]:
        """The upstream's streamed answer, asked with `stream_options.include_usage`.

        The answer's status is checked before this returns (a failure is an `UpstreamError`,
        a 502 for the client); the chunks are then passed on as they arrive. An upstream
        that fails mid-stream ends the stream there (logged): the client has its 200 already.
        """
        try:
            response = await client.send(
                client.build_request(
                    "POST",
                    f"{self.url}/chat/completions",
                    json=request.upstream_body(stream=True),
                    headers=self.headers(),
                    timeout=self.timeout,
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        kind = response.headers.get("content-type", "")
        if response.status_code >= 400 or not kind.startswith(EVENT_STREAM):
            await response.aclose()
            if response.status_code >= 400:
                raise UpstreamError(f"upstream answered HTTP {response.status_code}")
            raise UpstreamError("upstream answered a stream request without an event stream")
        return self._chunks(response)

    async def _chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():  # decoded: no Content-Encoding is passed on
                yield chunk
        except httpx.HTTPError as exc:
            logger.warning("Upstream %s: the stream broke off (%s)", self.url, type(exc).__name__)
        finally:
            await response.aclose()

    async def embeddings(self, client: httpx.AsyncClient, request: EmbeddingRequest) -> Reply:
        try:
            response = await client.post(
                f"{self.url}/embeddings",
                json=request.model_dump(),
                headers=self.headers(),
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}") from None
        return self._reply(response, request.model)


def _no_number(constant: str) -> None:
    return None


def _finite_or_none(text: str) -> float | None:
    number = float(text)
    return number if math.isfinite(number) else None
