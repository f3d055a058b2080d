"""What the emulator and the reference server share about an incoming OpenAI request.

Both answer a request they will not serve with a 4xx in vLLM's error shape and one message
naming the field or the limit; the checks here keep their answers the same: JSON bodies
only, no JSON constants (NaN, Infinity), a nesting limit checked without recursion, typed
boolean fields, the request limits (:class:`RequestLimits`) and the argparse type of their
options, and the model, chat and prompt checks both make before tokenizing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BadRequest", "RequestLimits", "add_limit_options", "chat_chars", "chat_ids", "check_model",
           "checked_argument", "encode_prompt", "flag", "is_json_type", "json_body", "nonneg_float", "positive_float",
           "positive_int", "too_long"]

#: what both servers take by default (the options' defaults too)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 65536
DEFAULT_MAX_JSON_DEPTH = 64
#: --max-prompt-chars by default: this many characters per token of --max-model-len
PROMPT_CHARS_PER_TOKEN = 16


class BadRequest(Exception):
    """A request refused with ``code`` (400 unless said) and this message."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


def is_json_type(content_type: str) -> bool:
    """Whether a Content-Type (parameters allowed) names JSON."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _no_constant(name: str) -> None:
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _openers_over(raw: bytes, limit: int) -> bool:
    """Whether ``raw`` holds more than ``limit`` of ``[`` and ``{``: only then can its JSON nest
    deeper than ``limit`` (memchr per opener, so a typical body costs microseconds where
    counting every byte would cost as much as parsing it)."""
    n = 0
    for opener in (b"[", b"{"):
        i = raw.find(opener)
        while i >= 0:
            n += 1
            if n > limit:
                return True
            i = raw.find(opener, i + 1)
    return False


def _check_depth(obj: dict | list, limit: int) -> None:
    """Refuse ``obj`` if it nests containers more than ``limit`` deep (level by level, no recursion)."""
    level, depth = [obj], 1
    while level:
        if depth > limit:
            raise BadRequest(f"request body nests JSON more than the limit of {limit} levels deep (--max-json-depth)")
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, (dict, list))]
        depth += 1


def flag(obj: dict, key: str, default: bool = False) -> bool:
    """A boolean field (null: ``default``)."""
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is not bool:
        raise BadRequest(f"'{key}' must be a boolean, got {type(value).__name__}")
    return value


def json_body(raw: bytes, max_depth: int) -> dict:
    """A request body as a JSON object, nesting at most ``max_depth`` levels."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest(f"request body nests JSON more than the limit of {max_depth} levels deep "
                         "(--max-json-depth)") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _openers_over(raw, max_depth):
        _check_depth(body, max_depth)
    return body


def checked_argument(text: str, convert: Callable[[str], Any], kind: str, ok: Callable[[Any], bool],
                     refusal: str) -> Any:
    """An argparse type's value: ``convert(text)`` (else "not {kind}: 'text'"), refused with
    ``refusal`` (formatted with ``text``) unless ``ok`` of it."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(refusal.format(text=text))
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer above 0."""
    return checked_argument(text, int, "an integer", lambda v: v > 0, "must be > 0, got {text}")


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    return checked_argument(text, float, "a number", lambda v: v > 0, "must be > 0, got {text}")


def nonneg_float(text: str) -> float:
    """argparse type: a number of 0 or more."""
    return checked_argument(text, float, "a number", lambda v: v >= 0, "must be >= 0, got {text}")


def too_long(limit: int, n: int | str) -> str:
    """vLLM's message for a prompt over the context length."""
    return (f"This model's maximum context length is {limit} tokens. However, your request has {n} input "
            "tokens. Please reduce the length of the input messages.")


def chat_chars(messages: object, max_model_len: int) -> int:
    """The characters of chat messages' text, checked before a template tokenizes them:
    refuses messages too many for the context (each costs 3 tokens at least) and a role that
    is not a string (a template looks it up in a dict); the template says what else is wrong."""
    if not isinstance(messages, list):
        return 0
    if 3 * len(messages) > max_model_len:
        raise BadRequest(too_long(max_model_len, f"more than {max_model_len}"))
    chars = 0
    for m in messages:
        if not isinstance(m, dict):
            continue
        if not isinstance(m.get("role"), str):
            raise BadRequest(f"a message's 'role' must be a string, got {type(m.get('role')).__name__}")
        content = m.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p) if isinstance(p, str) else len(p["text"])
                         if isinstance(p, dict) and isinstance(p.get("text"), str) else 0 for p in content)
    return chars


@dataclass(frozen=True)
class RequestLimits:
    """What a request may hold; what is over a limit gets a 4xx, checked before it costs much."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_prompt_chars: int | None = None  # None: PROMPT_CHARS_PER_TOKEN x max_model_len

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        """The limits given by the options of :func:`add_limit_options`."""
        return cls(max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes,
                   max_json_depth=args.max_json_depth, max_prompt_chars=args.max_prompt_chars)

    def check_chars(self, chars: int, max_model_len: int) -> None:
        """Refuse a prompt of ``chars`` characters over the limit, before it is tokenized."""
        limit = self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len
        if chars > limit:
            raise BadRequest(f"the prompt is {chars} characters long, over the limit of {limit} "
                             "(--max-prompt-chars); it was not tokenized")


def check_model(body: dict, served: str) -> None:
    """Refuse a request for a model other than the one ``served`` (no ``model``: that one)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {type(model).__name__}")
    if model is not None and model != served:
        raise BadRequest(f"The model `{model[:200]}` does not exist.", 404)


class _Tokenizer(Protocol):
    def encode(self, text: str) -> Any: ...

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True) -> list[int]: ...


def encode_prompt(tok: _Tokenizer, text: str) -> Any:
    """``text``'s token ids (a 400 for text that is not valid Unicode)."""
    try:
        return tok.encode(text)
    except UnicodeEncodeError:  # an unknown word is hashed as UTF-8, which a lone surrogate is not
        raise BadRequest("the prompt is not valid Unicode: it holds a lone surrogate (\\ud800-\\udfff)") from None


def chat_ids(tok: _Tokenizer, body: dict, limits: RequestLimits, max_model_len: int) -> list[int]:
    """The token ids of a chat request's messages through the chat template, their size checked first."""
    messages = body.get("messages")
    limits.check_chars(chat_chars(messages, max_model_len), max_model_len)
    try:
        return tok.apply_chat_template(messages, flag(body, "add_generation_prompt", True))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def add_limit_options(parser: argparse.ArgumentParser, header_note: str = "") -> None:
    """The request limits both servers take (what is over them gets a 4xx)."""
    lim = parser.add_argument_group("request limits (what is over them gets a 4xx)")
    lim.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                     help="413 for a request body over N bytes (default 16 MiB; a 1M-token prompt as text or "
                          "token ids is ~7 MB)")
    lim.add_argument("--max-header-bytes", type=positive_int, default=DEFAULT_MAX_HEADER_BYTES, metavar="N",
                     help=f"431 for a request line and headers over N bytes (default 64 KiB{header_note})")
    lim.add_argument("--max-json-depth", type=positive_int, default=DEFAULT_MAX_JSON_DEPTH, metavar="N",
                     help="400 for a JSON body nesting containers more than N deep (default 64)")
    lim.add_argument("--max-prompt-chars", type=positive_int, default=None, metavar="N",
                     help="400, before tokenizing, for a prompt (or chat messages' text) over N characters "
                          "(default 16 x --max-model-len)")
