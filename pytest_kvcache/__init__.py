"""pytest-kvcache: LLM-serving benchmarks of KV-cache offloading as regression tests."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
