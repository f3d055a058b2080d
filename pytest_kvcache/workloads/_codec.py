"""Tokenizers as the load generator sees them: the served model's, local or over HTTP.

Both count tokens the way the server does for a completions request (special tokens
included), so a prompt built to N tokens arrives as ``usage.prompt_tokens == N``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..errors import WorkloadError

__all__ = ["LocalTokenizer", "ServerTokenizer", "TokenCodec"]


class TokenCodec(Protocol):
    #: Upper bound (exclusive) of token ids safe to sample, or None when unknown.
    vocab_size: int | None

    async def encode(self, text: str) -> list[int]: ...

    async def decode(self, ids: Sequence[int]) -> str: ...


class ServerTokenizer:
    """The server's ``/tokenize`` and ``/detokenize`` (vLLM's shapes)."""

    vocab_size: int | None = None

    def __init__(self, client, model: str) -> None:  # client: httpx.AsyncClient with base_url
        self._client = client
        self._model = model

    async def encode(self, text: str) -> list[int]:
        body = await self._post("/tokenize", {"model": self._model, "prompt": text, "add_special_tokens": True})
        return list(body["tokens"])

    async def decode(self, ids: Sequence[int]) -> str:
        body = await self._post("/detokenize", {"model": self._model, "tokens": list(ids)})
        return body["prompt"]

    async def _post(self, path: str, payload: dict) -> dict:
        import httpx

        try:
            response = await self._client.post(path, json=payload, timeout=120)
        except httpx.HTTPError as exc:
            raise WorkloadError(f"{path} on {self._client.base_url} failed: {exc!r}") from None
        if response.status_code != 200:
            raise WorkloadError(
                f"{path} on {self._client.base_url} answered HTTP {response.status_code}: {response.text[:300]}; "
                "the server must offer vLLM's /tokenize and /detokenize, or pass --tokenizer PATH"
            )
        return response.json()


class LocalTokenizer:
    """A Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:  # pragma: no cover - tokenizers is a dependency
            raise WorkloadError("--tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise WorkloadError(f"--tokenizer {path}: no tokenizer.json there; pass a model folder or the file itself")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises plain Exception subclasses
            raise WorkloadError(f"--tokenizer {file}: cannot be loaded: {exc}") from None
        self.vocab_size: int | None = self._tokenizer.get_vocab_size(with_added_tokens=False)

    async def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=True).ids

    async def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)
