"""A request's size in tokens, before it is sent: what the router buckets it by.

Input: the prompt (a chat's message contents, joined) at 4 characters per token, times a correction learnt from the
replicas' own counts — a bounded moving average of reported `usage.prompt_tokens` / estimate, one per endpoint (chat
templates add tokens that completions do not). chars/4 is close for English and far off for code or CJK text; the
correction pulls it back within a few dozen requests. With `--tokenizer tokenizer.json` the text is counted with the
model's own tokenizer (the `tokenizers` package, an optional extra) and the correction only covers what the server
adds (BOS, the chat template). Prompts given as token ids are counted exactly.

Output: `max_completion_tokens` or `max_tokens`, an upper bound (the prompt gives nothing better cheaply); None when
the request sets neither, and the policy then routes by the input row alone.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from melange_sky.errors import ServeError

CHARS_PER_TOKEN = 4.0
#: The correction factor stays within these bounds, whatever a replica reports (CJK text is ~1 char per token: 4x).
CORRECTION_BOUNDS = (0.25, 4.0)
#: Weight of one response in the moving average (about the last 1 / ALPHA requests count).
ALPHA = 0.05
#: Prompts estimated below this many tokens do not move the average: their ratio is mostly template overhead.
MIN_TOKENS_TO_LEARN = 8

__all__ = ["Kind", "Sizer", "load_tokenizer", "output_tokens"]


class Kind(StrEnum):
    """The OpenAI endpoint a request came to."""

    COMPLETIONS = "completions"
    CHAT = "chat"


Counter = Callable[[str], int]


def load_tokenizer(path: str | os.PathLike[str]) -> Counter:
    """A token counter from a local `tokenizer.json` (Hugging Face `tokenizers`); one-line errors otherwise."""
    try:
        import tokenizers  # noqa: PLC0415 - heavy optional extra: only with --tokenizer
    except ImportError:
        raise ServeError("--tokenizer needs the tokenizers package: pip install 'melange-sky[tokenizers]'") from None
    if not os.path.isfile(path):
        raise ServeError(f"--tokenizer {path}: no such file (give the model's tokenizer.json)")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception for any bad file
        raise ServeError(f"--tokenizer {path}: not a tokenizers JSON file ({exc})") from None

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    return count


def output_tokens(body: dict[str, Any]) -> int | None:
    """The most tokens the request may generate, if it says (`max_completion_tokens` wins, as in OpenAI's API)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


class Sizer:
    """Estimates a request's prompt tokens and learns from the replicas' reported counts."""

    def __init__(self, counter: Counter | None = None):
        self.counter = counter
        self.corrections: dict[Kind, float] = {kind: 1.0 for kind in Kind}

    def raw_prompt_tokens(self, body: dict[str, Any], kind: Kind) -> tuple[float, bool]:
        """(uncorrected estimate, exact): exact when the prompt is token ids. A batch of prompts is sized by its
        longest."""
        if kind is Kind.CHAT:
            parts = _chat_parts(body.get("messages"))
            if self.counter is not None:
                return self._count("\n".join(parts)), False
            return (sum(map(len, parts)) + max(len(parts) - 1, 0)) / CHARS_PER_TOKEN, False
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self._count(prompt), False
        if isinstance(prompt, list) and prompt:
            if all(isinstance(x, int) for x in prompt):  # one prompt as token ids
                return float(len(prompt)), True
            if all(isinstance(x, list) for x in prompt):  # a batch of token-id prompts
                return float(max(len(x) for x in prompt)), True
            texts = [x for x in prompt if isinstance(x, str)]
            return (max(self._count(x) for x in texts) if texts else 0.0), False
        return 0.0, False

    def prompt_tokens(self, body: dict[str, Any], kind: Kind) -> tuple[int, float]:
        """(corrected estimate used for routing, raw estimate to learn from)."""
        raw, exact = self.raw_prompt_tokens(body, kind)
        if exact:
            return int(raw), raw
        return int(round(raw * self.corrections[kind])), raw

    def observe(self, kind: Kind, raw: float, reported: int) -> None:
        """Move the correction toward reported / raw (bounded); small prompts teach nothing."""
        if raw < MIN_TOKENS_TO_LEARN or reported <= 0:
            return
        low, high = CORRECTION_BOUNDS
        ratio = min(max(reported / raw, low), high)
        value = (1 - ALPHA) * self.corrections[kind] + ALPHA * ratio
        self.corrections[kind] = min(max(value, low), high)

    def _count(self, text: str) -> float:
        if not text:
            return 0.0
        if self.counter is not None:
            return float(self.counter(text))
        return len(text) / CHARS_PER_TOKEN


def _chat_parts(messages: Any) -> list[str]:
    """The text of a chat's messages: string contents, and the text parts of multi-part contents."""
    if not isinstance(messages, list):
        return []
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return parts
