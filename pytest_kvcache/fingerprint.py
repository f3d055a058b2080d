"""What a baseline was measured on: compared before any numbers are.

A baseline is only compared with a run whose fingerprint is equal: the same server
kind and versions, GPU, model, offload configuration and workload. The emulator's
times are modeled, so its fingerprint names the emulator profile, not the host.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from .models import ScenarioCase

__all__ = ["FINGERPRINT_VERSION", "case_fingerprint", "stable_hash"]

#: Bumped when the meaning of measured numbers changes (load generator, emulator model).
FINGERPRINT_VERSION = "1"


def stable_hash(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def case_fingerprint(case: ScenarioCase, model: str, server_info: Mapping[str, str],
                     backend_fingerprint: Mapping[str, str]) -> dict[str, str]:
    """The emulator's slowdown knob is left out on purpose: it stands for a regression."""
    fp = {"fingerprint_version": FINGERPRINT_VERSION, "model": model, **{k: str(v) for k, v in server_info.items()}}
    fp.update(backend_fingerprint)
    fp["workload_hash"] = stable_hash(case.workload_params)
    return fp
