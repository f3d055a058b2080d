"""What a request asks the emulator for: its prompt as token ids and chunk keys, and its options.

Every refusal is a :class:`~pytest_kvcache._openai_request.BadRequest` with vLLM's message
where vLLM has one; a prompt too long to serve is refused before it is tokenized.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._openai_request import BadRequest, chat_ids, encode_prompt, flag, too_long
from .prefix_cache import PrefixCache
from .request import Prompt
from .settings import Settings
from .tokenizer import WordTokenizer

__all__ = ["MAX_CACHE_SALT_CHARS", "Generation", "PromptReader"]

#: vLLM's cache_salt has no length limit; the emulator's keeps a hostile one cheap
MAX_CACHE_SALT_CHARS = 256

#: Prompts of at least this many characters are remembered (ids and chunk keys) ...
_MEMO_MIN_CHARS = 20_000
#: ... up to this many tokens in all (4 bytes each), the oldest forgotten first.
_MEMO_MAX_TOKENS = 30_000_000


@dataclass(frozen=True)
class Generation:
    """A generation request, checked: its prompt's ids (``text``: the prompt, where it came as
    one string; ``memo``: the prompt as served before), its salt and its options."""

    ids: Sequence[int]
    text: str | None
    memo: Prompt | None
    salt: str | None
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous: bool


def cache_salt(body: dict) -> str | None:
    """A request's ``cache_salt`` (vLLM's rule: a non-empty string if given), bounded."""
    salt = body.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str):
        raise BadRequest(f"'cache_salt' must be a string, got {type(salt).__name__}")
    if not salt:
        raise BadRequest("Parameter 'cache_salt' must be a non-empty string if provided.")
    if len(salt) > MAX_CACHE_SALT_CHARS:
        raise BadRequest(f"'cache_salt' is {len(salt)} characters long, over the emulator's limit of "
                         f"{MAX_CACHE_SALT_CHARS}")
    return salt


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request's ``stream_options``."""
    so = body.get("stream_options")
    if so is None:
        so = {}
    if not isinstance(so, dict):
        raise BadRequest("stream_options must be an object")
    return flag(so, "include_usage") and stream, flag(so, "continuous_usage_stats") and stream


class PromptReader:
    """Turns request bodies into prompts the emulator serves, remembering long ones."""

    def __init__(self, settings: Settings, tok: WordTokenizer, cache: PrefixCache) -> None:
        self.s = settings
        self.tok = tok
        self.cache = cache
        # A warm round resends the cold round's prompts: tokenizing and hashing a 100k-word
        # prompt again (~13 ms of a 2-core VM) is host time the model does not charge, and it
        # would hold the loop past the short modeled windows of warm requests.
        self._prompts: OrderedDict[tuple[int, int, str | None], Prompt] = OrderedDict()
        self._prompt_tokens = 0

    def check_chars(self, chars: int) -> None:
        self.s.limits.check_chars(chars, self.s.max_model_len)

    def encode(self, text: str) -> Sequence[int]:
        return encode_prompt(self.tok, text)

    def chat_ids(self, body: dict) -> list[int]:
        return chat_ids(self.tok, body, self.s.limits, self.s.max_model_len)

    def generation(self, body: dict, chat: bool) -> Generation:
        """The checked generation request of ``body`` (a chat's with ``chat``)."""
        salt = cache_salt(body)
        memo = text = None
        if chat:
            ids: Sequence[int] = self.chat_ids(body)
        else:
            if "prompt" not in body:
                raise BadRequest("'prompt' is required")
            prompt = body["prompt"]
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            self._check_prompt_size(prompt)
            if isinstance(prompt, str):
                text = prompt
                memo = self._remembered(prompt, salt)
            ids = memo.ids if memo else self._ids_from_prompt(prompt)
        n = len(ids)
        if n == 0:
            raise BadRequest("The prompt is empty: at least one token is required")
        max_tokens = self._max_tokens(body, n, chat)
        stream = flag(body, "stream")
        include_usage, continuous = _stream_options(body, stream)
        return Generation(ids, text, memo, salt, max_tokens, stream, include_usage, continuous)

    def served(self, gen: Generation) -> Prompt:
        """``gen``'s prompt as served: ids, chunk keys and digest (remembered if long)."""
        if gen.memo is not None:
            return gen.memo
        served = self._serve_as(gen.ids, gen.salt)
        if gen.text is not None:
            self._remember(gen.text, gen.salt, served)
        return served

    def _check_prompt_size(self, prompt: Any) -> None:
        """Refuse a prompt too long to serve before it is tokenized (that would hold the loop)."""
        if isinstance(prompt, str):
            self.check_chars(len(prompt))
        elif isinstance(prompt, list) and prompt and type(prompt[0]) is int and len(prompt) > self.s.max_model_len:
            raise BadRequest(too_long(self.s.max_model_len, len(prompt)))

    def _remembered(self, prompt: str, salt: str | None) -> Prompt | None:
        """A long prompt seen before with this salt (None: not seen, or short)."""
        if len(prompt) < _MEMO_MIN_CHARS:
            return None
        key = (len(prompt), hash(prompt), salt)
        found = self._prompts.get(key)
        if found is not None:
            self._prompts.move_to_end(key)
        return found

    def _remember(self, prompt: str, salt: str | None, served: Prompt) -> None:
        if len(prompt) < _MEMO_MIN_CHARS:
            return
        self._prompts[(len(prompt), hash(prompt), salt)] = served
        self._prompt_tokens += len(served.ids)
        while self._prompt_tokens > _MEMO_MAX_TOKENS and self._prompts:
            _, old = self._prompts.popitem(last=False)
            self._prompt_tokens -= len(old.ids)

    def _serve_as(self, ids: Sequence[int], salt: str | None) -> Prompt:
        """``ids`` with their chunk keys and digest (one blake2b pass: ~0.5 ms per 100k tokens)."""
        arr = ids if isinstance(ids, array) else array("I", ids)
        keys = self.cache.keys(arr, salt) if self.cache.enabled else []
        return Prompt(arr, keys, hashlib.blake2b(arr, digest_size=16).digest())

    def _ids_from_prompt(self, prompt: Any) -> Sequence[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, list):
            return self._token_ids(prompt)
        raise BadRequest("'prompt' must be a string or a list of token ids")

    def _token_ids(self, prompt: list) -> Sequence[int]:
        """A prompt given as token ids, checked against the vocabulary."""
        if not prompt:
            return []
        v = self.s.vocab_size
        try:
            arr = array("I", prompt)  # C speed: rejects non-ints and negatives
        except OverflowError:
            raise BadRequest(f"token id out of vocabulary range [0, {v})") from None
        except TypeError:
            if all(isinstance(p, (str, list)) for p in prompt):
                raise BadRequest("the emulator serves one prompt per request") from None
            raise BadRequest("'prompt' must be a string, a list of token ids, "
                             "or a one-element list of either") from None
        # max() of the list reuses its ints (twice as fast as the array's); the array
        # is returned because hashing the chunk keys copies it at C speed
        if max(prompt) >= v:
            raise BadRequest(f"token ids must be integers in [0, {v})")
        return arr

    def _max_tokens(self, body: dict, n: int, chat: bool) -> int:
        mt = body.get("max_tokens")
        if chat and body.get("max_completion_tokens") is not None:
            mt = body.get("max_completion_tokens")
        if mt is None:
            mt = self.s.default_max_tokens
        if type(mt) is not int or mt < 1:
            raise BadRequest("max_tokens must be a positive integer")
        m = self.s.max_model_len
        if n > m:
            raise BadRequest(too_long(m, n))
        if n + mt > m:
            raise BadRequest(
                f"This model's maximum context length is {m} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the messages, {mt} in the completion). Please reduce "
                "the length of the messages or completion.")
        return mt
