"""The OpenAI API as vLLM's server speaks it, for the emulator: reading a generation request, and the bytes of its
answer (a whole JSON document, or server-sent events), with no clock and no engine in sight.

Shapes follow vLLM's OpenAI server (`vllm/entrypoints/openai/protocol.py`, `serving_completion.py`,
`serving_chat.py`): `text_completion` / `chat.completion` documents with `usage`; streamed `text_completion` /
`chat.completion.chunk` events, the chat's first event carrying the assistant role; with
`stream_options.include_usage` one last event with `"choices": []` and the usage; then `data: [DONE]`. Errors are
`{"error": {"message", "type", "param", "code"}}` as in vLLM's `ErrorResponse`.

Token counts, cheaply and deterministically (there is no tokenizer): a prompt's tokens are its whitespace-separated
words (a chat's: the words of its messages' text contents together), at least 1; a prompt given as token ids is
counted exactly. `melange-sky profile` sends prompts of N common words that are one token each, so it gets back the
N it sent. Each output token is one filler word with its leading space.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

#: vLLM's (and OpenAI's) default max_tokens for /v1/completions.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: A chat without max_tokens gets this many at most. vLLM's default is the rest of the context, which a real model
#: rarely reaches because it ends at its EOS token; the filler never does, so the emulator caps it here.
CHAT_DEFAULT_MAX_TOKENS = 256
#: The filler text: one word per token, cycled (plain ASCII, nothing to escape in JSON).
FILLER = tuple(" the of and to in is it you that he was for on are with as his they at be this from have or by".split())
_FILLER_BYTES = tuple(f" {w}".encode() for w in FILLER)
DONE = b"data: [DONE]\n\n"
#: The one thing that tells the emulator from vLLM: a response header on every answer, its value the emulator's
#: `--speed`. vLLM's clients ignore it; `profile --endpoint` reads it so its record says it measured an emulator
#: (which `estimate --calibrate` refuses to fit).
EMULATOR_HEADER = "X-Melange-Sky-Emulator"


def emulator_header_value(speed: float) -> str:
    """The header's value: the speed, as `--speed` takes it ("50", "1", "0.5")."""
    return f"{speed:g}"


def parse_emulator_header(value: str) -> float | None:
    """The speed an emulator's header gives; None when the value is not a positive number (emulated all the same)."""
    try:
        speed = float(value.strip())
    except ValueError:
        return None
    return speed if speed > 0 and speed != float("inf") else None


class Kind(StrEnum):
    """The OpenAI endpoint a request came to."""

    COMPLETIONS = "completions"
    CHAT = "chat"


class ApiError(Exception):
    """A request the server answers with an HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.kind)


def error_body(status: int, message: str, kind: str) -> bytes:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


@dataclass(frozen=True)
class Generation:
    """One generation request, as the emulator runs it."""

    kind: Kind
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool


def count_words(text: str) -> int:
    """Prompt tokens of a text: its whitespace-separated words."""
    return len(text.split())


def _prompt_tokens(body: dict[str, Any], kind: Kind) -> int:
    if kind == Kind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages: a non-empty list of messages is required")
        words = 0
        for message in messages:
            if not isinstance(message, dict):
                raise ApiError(400, "messages: each message must be an object with a role and a content")
            content = message.get("content")
            if isinstance(content, str):
                words += count_words(content)
            elif isinstance(content, list):  # content parts: count the text ones
                words += sum(count_words(p["text"]) for p in content
                             if isinstance(p, dict) and isinstance(p.get("text"), str))
        return max(1, words)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return max(1, count_words(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return len(prompt)  # token ids: counted exactly
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "prompt: the emulator serves one prompt per request (send a batch as separate requests)")
    raise ApiError(400, "prompt: a string or a list of token ids is required")


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{name} must be at least 1, got {value!r}")
    return value


#: Sampling parameters vLLM reads (its request models' types and `SamplingParams._verify_args`' ranges): the
#: emulator ignores their values but refuses what vLLM refuses, so a client's bad request fails here as it would
#: there. name -> (integer, lowest, lowest allowed, highest, highest allowed) with None for no bound.
_SAMPLING: dict[str, tuple[bool, float | None, bool, float | None, bool]] = {
    "temperature": (False, 0.0, True, None, True),
    "top_p": (False, 0.0, False, 1.0, True),
    "min_p": (False, 0.0, True, 1.0, True),
    "presence_penalty": (False, -2.0, True, 2.0, True),
    "frequency_penalty": (False, -2.0, True, 2.0, True),
    "repetition_penalty": (False, 0.0, False, None, True),
    "top_k": (True, -1.0, True, None, True),
    "seed": (True, None, True, None, True),
    "min_tokens": (True, 0.0, True, None, True),
}


def _sampling_value(name: str, value: Any, integer: bool) -> float:
    """`value` read as pydantic's lax mode reads a JSON number for vLLM (numbers, numeric strings and booleans);
    ApiError 400 with pydantic's words otherwise."""
    kind = "integer" if integer else "number"
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ApiError(400, f"{name}: Input should be a valid {kind}, unable to parse string as "
                                f"{'an integer' if integer else 'a number'} (got {value!r})") from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise ApiError(400, f"{name}: Input should be a valid {kind} (got {value!r})")
    if integer and not number.is_integer():
        raise ApiError(400, f"{name}: Input should be a valid integer, got a number with a fractional part "
                            f"(got {value!r})")
    return number


def _check_sampling(body: dict[str, Any]) -> None:
    """Refuse sampling parameters of the wrong type or out of vLLM's range, in its words."""
    for name, (integer, low, low_ok, high, high_ok) in _SAMPLING.items():
        if body.get(name) is None:
            continue
        number = _sampling_value(name, body[name], integer)
        shown = f"{number:g}" if not integer else f"{int(number)}"
        if low is not None and (number < low or (number == low and not low_ok)) or \
                high is not None and (number > high or (number == high and not high_ok)) or number != number:
            if name == "temperature":
                raise ApiError(400, f"temperature must be non-negative, got {shown}.")
            if name == "repetition_penalty":
                raise ApiError(400, f"repetition_penalty must be greater than zero, got {shown}.")
            if name == "top_k":
                raise ApiError(400, f"top_k must be -1 (disable), or at least 1, got {shown}.")
            if name == "min_tokens":
                raise ApiError(400, f"min_tokens must be greater than or equal to 0, got {shown}.")
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise ApiError(400, f"{name} must be in {bounds}, got {shown}.")


def parse_generation(body: Any, kind: Kind, served_model: str, max_model_len: int) -> Generation:
    """Read a /v1/completions or /v1/chat/completions body; ApiError (400 or 404, vLLM's messages) if the server
    would refuse it. max_tokens beyond the context (max_model_len - prompt) is refused, as vLLM does."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: the emulator serves n = 1 only")
    _check_sampling(body)
    prompt_tokens = _prompt_tokens(body, kind)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.")
    include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
    asked = _positive_int(body, "max_completion_tokens") if kind == Kind.CHAT else None
    asked = asked if asked is not None else _positive_int(body, "max_tokens")
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                            f"has {prompt_tokens} tokens. Please reduce the length of the prompt.")
    if asked is None:
        default = COMPLETIONS_DEFAULT_MAX_TOKENS if kind == Kind.COMPLETIONS else CHAT_DEFAULT_MAX_TOKENS
        max_tokens = min(default, room)
    elif asked > room:
        raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in "
                            f"the completion). Please reduce the length of the messages or completion.")
    else:
        max_tokens = asked
    return Generation(kind=kind, model=served_model, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                      stream=stream, include_usage=include_usage)


def filler_text(start: int, count: int) -> str:
    """The text of output tokens start .. start + count - 1."""
    return "".join(f" {FILLER[k % len(FILLER)]}" for k in range(start, start + count))


def usage(gen: Generation, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


class Answer:
    """The bytes of one request's answer. A stream's token events are built from two pre-encoded halves around the
    token's text, so a token costs a join, not a JSON encoding (hundreds of streams share one core)."""

    __slots__ = ("gen", "rid", "created", "_head", "_tail", "_first", "_chunks")

    def __init__(self, gen: Generation):
        self.gen = gen
        chat = gen.kind == Kind.CHAT
        self.rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(16)
        self.created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        envelope = orjson.dumps({"id": self.rid, "object": obj, "created": self.created, "model": gen.model})[:-1]
        if chat:
            self._head = b"data: " + envelope + b',"choices":[{"index":0,"delta":{"content":"'
            self._first = (b"data: " + envelope + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                           b'"logprobs":null,"finish_reason":null}]}\n\n')
        else:
            self._head = b"data: " + envelope + b',"choices":[{"index":0,"text":"'
            self._first = b""
        self._tail = b'"' + (b"}" if chat else b"") + b',"logprobs":null,"finish_reason":'
        self._chunks: tuple[bytes, ...] | None = None

    def tokens(self, start: int, count: int, last: bool) -> bytes:
        """The events of output tokens start .. start + count - 1 (the chat's role event before token 0; the last
        token of the generation carries finish_reason "length")."""
        parts = [self._first] if start == 0 else []
        for k in range(start, start + count):
            reason = b'"length"' if last and k == start + count - 1 else b"null"
            parts.append(self._head + _FILLER_BYTES[k % len(_FILLER_BYTES)] + self._tail + reason
                         + b',"stop_reason":null}]}\n\n')
        return b"".join(parts)

    def chunk(self, index: int, last: bool) -> bytes:
        """Token `index`'s event framed as one HTTP/1.1 chunk (what a chunked response carries), built once per
        filler word for a request and reused."""
        if last or index == 0:
            data = self.tokens(index, 1, last)
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self._chunks is None:
            self._chunks = tuple(b"%x\r\n%b\r\n" % (len(data), data)
                                 for data in (self.tokens(k, 1, False) for k in range(len(_FILLER_BYTES))))
        return self._chunks[index % len(self._chunks)]

    def end(self, completion_tokens: int) -> bytes:
        """What closes a stream: the usage event if asked for, then [DONE]."""
        if not self.gen.include_usage:
            return DONE
        obj = "chat.completion.chunk" if self.gen.kind == Kind.CHAT else "text_completion"
        event = {"id": self.rid, "object": obj, "created": self.created, "model": self.gen.model, "choices": [],
                 "usage": usage(self.gen, completion_tokens)}
        return b"data: " + orjson.dumps(event) + b"\n\n" + DONE

    def whole(self, completion_tokens: int) -> bytes:
        """A non-streamed answer."""
        text = filler_text(0, completion_tokens)
        choice: dict[str, Any]
        if self.gen.kind == Kind.CHAT:
            obj = "chat.completion"
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                      "logprobs": None, "finish_reason": "length", "stop_reason": None}
        else:
            obj = "text_completion"
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None,
                      "prompt_logprobs": None}
        return orjson.dumps({"id": self.rid, "object": obj, "created": self.created, "model": self.gen.model,
                             "choices": [choice], "usage": usage(self.gen, completion_tokens)})


__all__ = ["CHAT_DEFAULT_MAX_TOKENS", "COMPLETIONS_DEFAULT_MAX_TOKENS", "EMULATOR_HEADER", "FILLER", "Answer",
           "ApiError", "Generation", "Kind", "count_words", "emulator_header_value", "error_body", "filler_text",
           "parse_emulator_header", "parse_generation"]
