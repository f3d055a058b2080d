"""The built-in emulator of a vLLM + LMCache OpenAI-compatible server.

Run it as ``python -m pytest_kvcache.emulator --port P --backend cpu`` (see
``__main__`` for the flags).  Modules: :mod:`.tokenizer` (synthetic word tokenizer),
:mod:`.costmodel` (timing profiles and formulas), :mod:`.prefix_cache` (chunked prefix
cache and its tiers), :mod:`.app` (the aiohttp application).  Importing this package
imports nothing heavy; aiohttp is loaded by :mod:`.app` only.
"""

__all__ = ["app", "costmodel", "prefix_cache", "tokenizer"]
