"""What an AI request will cost before it runs: tokens from its body, money from a price table.

A token limit reserves an estimate when a request arrives and settles on the usage the app
reports when it ends, so the estimate only has to be good enough to refuse early: the
difference is refunded or charged afterwards. The default is a documented approximation, not
a tokenizer: about four characters of English text per token (OpenAI's rule of thumb), plus
the completion the request asks for at most (`max_tokens`, `max_completion_tokens`,
`max_output_tokens`), or `default_completion` when it names none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convex_guard.core.errors import ConfigurationError

#: Characters per token of the default estimate (English text; code and other scripts run
#: denser, and the settlement corrects whatever the estimate misses).
CHARS_PER_TOKEN = 4.0
#: The completion reserved when a request names no maximum.
DEFAULT_COMPLETION_TOKENS = 1024
#: Prices are per million tokens, as providers quote them.
PRICE_PER = 1_000_000
#: The body fields that cap a completion, in the order they are read.
_COMPLETION_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
#: The body fields whose text is the prompt (chat, completions, embeddings, responses).
_PROMPT_FIELDS = ("messages", "prompt", "input", "system", "instructions")
#: How deep the prompt's text is looked for: content parts sit three levels down.
_MAX_DEPTH = 6
#: Keys whose strings are not prompt text: a part's `type`, and media (an image's data URL
#: would count as a quarter of a million tokens per megabyte). Media are settled on use.
_NOT_TEXT = frozenset(("type", "image_url", "input_audio", "file", "image", "audio"))


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """The default estimate of a request's tokens, from its JSON body.

    Prompt: the characters of every string under `messages`, `prompt`, `input`, `system` and
    `instructions` (message contents and roles, content parts' `text`, tool call arguments
    alike; not media parts nor a part's `type`), divided by `chars_per_token` and rounded up.
    Completion: the request's `max_completion_tokens`, `max_tokens` or `max_output_tokens`
    (the first that is a whole number >= 0), else `default_completion`. A body that is not a
    JSON object is estimated from its length in bytes as if it were all prompt.
    """

    chars_per_token: float = CHARS_PER_TOKEN
    default_completion: int = DEFAULT_COMPLETION_TOKENS

    def __post_init__(self) -> None:
        if not (0 < self.chars_per_token < math.inf):
            raise ConfigurationError("chars_per_token must be a positive number")
        if isinstance(self.default_completion, bool) or not (
            isinstance(self.default_completion, int) and self.default_completion >= 0
        ):
            raise ConfigurationError("default_completion must be a whole number >= 0")

    def tokens(self, payload: object, body: bytes) -> float:
        """The estimate for a request whose body is `body`, `payload` once parsed (or None)."""
        prompt = self.prompt(payload, body)
        if not isinstance(payload, dict):
            return prompt
        return prompt + completion_tokens(payload, self)

    def prompt(self, payload: object, body: bytes) -> float:
        """The prompt's part of the estimate (all of it for a body that is not a JSON object)."""
        if not isinstance(payload, dict):
            return float(math.ceil(len(body) / self.chars_per_token))
        chars = 0
        for name in _PROMPT_FIELDS:
            value = payload.get(name)
            if value is not None:
                chars += _text_length(value, 0)
        return float(math.ceil(chars / self.chars_per_token))


#: The estimate a token or cost rule makes when it is given none.
DEFAULT_ESTIMATE = TokenEstimate()


def completion_tokens(payload: Mapping[str, Any], estimate: TokenEstimate) -> int:
    """The completion a request may use at most: the first maximum it names, else the default."""
    for name in _COMPLETION_FIELDS:
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return estimate.default_completion


def _text_length(value: object, depth: int) -> int:
    # A loop, not `sum` over a generator: a generator frame per list and dict cost more than
    # the counting (a chat body's few strings sit under two or three of them).
    if isinstance(value, str):
        return len(value)
    if depth >= _MAX_DEPTH:
        return 0
    chars = 0
    if isinstance(value, list):
        for item in value:
            chars += len(item) if isinstance(item, str) else _text_length(item, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _NOT_TEXT:
                chars += len(item) if isinstance(item, str) else _text_length(item, depth + 1)
    return chars


def check_prices(prices: Mapping[str, float]) -> dict[str, float]:
    """A price table as a plain dict, or `ConfigurationError` for a price that is not one."""
    if isinstance(prices, str) or not isinstance(prices, Mapping):
        raise ConfigurationError("prices must map model names to a price per million tokens")
    checked: dict[str, float] = {}
    for model, price in prices.items():
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"price table: model {model!r} must be a non-empty name")
        if isinstance(price, bool) or not isinstance(price, int | float):
            raise ConfigurationError(f"price of {model!r} must be a number")
        if not 0 <= price < math.inf:
            raise ConfigurationError(f"price of {model!r} must be a finite number >= 0")
        checked[model] = float(price)
    return checked


def token_cost(prices: Mapping[str, float], model: str | None, tokens: float) -> float | None:
    """What `tokens` of `model` cost by `prices` (per million tokens); None if unpriced."""
    if model is None:
        return None
    price = prices.get(model)
    return None if price is None else tokens * price / PRICE_PER
