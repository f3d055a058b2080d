"""Noisy run series, and where the detector finds changes in them: what the change-point tests share."""

from __future__ import annotations

import numpy as np

from pytest_kvcache.changepoints import detect


def noisy(n: int, seed: int, noise: float = 0.01, level: float = 100.0) -> np.ndarray:
    """``n`` runs at ``level`` with lognormal noise of ``noise`` (relative)."""
    return level * np.exp(np.random.default_rng(seed).normal(0.0, noise, n))


def indices(values) -> list[int]:
    return [c.index for c in detect(values)]
