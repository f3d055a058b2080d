"""The built-in emulator of a vLLM + LMCache OpenAI-compatible server.

Run it as ``python -m pytest_kvcache.emulator --port P --backend cpu`` (see
``__main__`` for the flags).  :mod:`.app` composes the parts (its docstring lists them and
describes the behaviour; docs/emulator.md has the module layout).  Importing this package
imports nothing heavy; aiohttp is loaded by :mod:`.app` and :mod:`.http` only.
"""

__all__ = ["answer", "app", "costmodel", "faults", "http", "metrics", "offload", "prefix_cache", "prompts", "resp",
           "scheduler", "settings", "tiers", "tokenizer"]
