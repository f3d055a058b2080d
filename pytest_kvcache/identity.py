"""What a run is compared on (the testbed) and what it is compared across (the software).

A baseline is keyed by its **testbed**: the hardware (GPU model and count, CPU, memory),
the runner's labels (storage, network), the model, the offload configuration, the
workload and the plugin's measurement version. Two runs on different testbeds are not
compared. The **software under test** (vLLM, LMCache, torch, CUDA driver, an external
server's ``GET /version``, the user's ``--kv-version`` keys such as a deployment commit)
is recorded on every run and compared *across*: a nightly gate exists to catch what an
upgrade does. Ports, scratch paths and endpoint addresses are neither.

The emulator's times are modeled and do not depend on the host, so its testbed names
no hardware: its baselines travel. A user moves a key from one side to the other with
the ini keys ``kvcache_testbed_keys`` and ``kvcache_software_keys`` (glob patterns).

This module does not import pytest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .models import ScenarioCase

__all__ = [
    "MEASUREMENT_VERSION",
    "SOFTWARE_KEYS",
    "Identity",
    "KeyMoves",
    "host_facts",
    "item_identity",
    "machine_part",
    "software_change",
    "split_legacy_fingerprint",
    "stable_hash",
    "diff_testbeds",
    "testbed_id",
]

#: Bumped when the meaning of measured numbers changes (load generator, emulator model).
MEASUREMENT_VERSION = "2"

#: Keys that name the software under test: provenance, compared across.
SOFTWARE_KEYS: frozenset[str] = frozenset({
    "vllm_version", "vllm_dist", "lmcache_version", "torch_version", "mooncake_version", "driver_version",
    "cuda_version", "server_version", "plugin_version",
})
#: Keys that are neither: where things ran this time, derived facts.
_IGNORED_KEYS: frozenset[str] = frozenset({"endpoint", "services", "dropped_flags"})
#: Testbed keys of one item rather than of the machine (left out when pooling noise).
_ITEM_KEYS: frozenset[str] = frozenset({"workload_hash", "backend", "backend_config", "kv_mode"})
_ADDRESS = re.compile(r"\b([a-z][a-z0-9+.-]*://)?(?:\d{1,3}(?:\.\d{1,3}){3}|localhost|\[[0-9a-f:]+\])(?::\d+)?",
                      re.IGNORECASE)


def testbed_id(testbed: Mapping[str, str]) -> str:
    """A short stable digest of a testbed: the key of a history series (item x metric x testbed)."""
    text = json.dumps(dict(sorted(testbed.items())), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stable_hash(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class KeyMoves:
    """Keys the user moved: software keys that must match, testbed keys compared across."""

    to_testbed: tuple[str, ...] = ()
    to_software: tuple[str, ...] = ()

    def side(self, key: str) -> str:
        """'testbed', 'software' or 'ignored'."""
        if any(fnmatch.fnmatchcase(key, p) for p in self.to_software):
            return "software"
        if any(fnmatch.fnmatchcase(key, p) for p in self.to_testbed):
            return "testbed"
        if key in SOFTWARE_KEYS or key.startswith("version."):
            return "software"
        return "ignored" if key in _IGNORED_KEYS else "testbed"


@dataclass(frozen=True)
class Identity:
    """One item's testbed and software under test."""

    testbed: Mapping[str, str]
    software: Mapping[str, str] = field(default_factory=dict)

    @property
    def testbed_id(self) -> str:
        return testbed_id(self.testbed)


def _without_addresses(text: str) -> str:
    return _ADDRESS.sub(lambda m: (m.group(1) or "") + "<address>", text)


def item_identity(case: ScenarioCase, model: str, server_info: Mapping[str, str],
                  backend_fingerprint: Mapping[str, str], *, host: Mapping[str, str] | None = None,
                  versions: Sequence[tuple[str, str]] = (), moves: KeyMoves = KeyMoves()) -> Identity:
    """Split everything known about an item's run into its testbed and its software.

    ``server_info`` is what the server reported of itself (kind, versions, GPU, labels);
    ``host`` the machine's facts where the server runs on it (:func:`host_facts`);
    ``versions`` the user's ``--kv-version`` pairs (recorded as ``version.KEY``). The
    emulator's slowdown knob is not here: it stands for a regression (and a run made
    with it is never stored as a baseline).
    """
    facts: dict[str, str] = {"measurement_version": MEASUREMENT_VERSION, "model": model}
    facts.update({k: str(v) for k, v in server_info.items()})
    facts.update(host or {})
    facts.update(backend_fingerprint)
    facts["workload_hash"] = stable_hash(case.workload_params)
    from . import __version__

    facts["plugin_version"] = __version__
    facts.update({f"version.{k}": v for k, v in versions})
    testbed, software = {}, {}
    for key, value in facts.items():
        side = moves.side(key)
        if side == "testbed":
            testbed[key] = _without_addresses(value)
        elif side == "software":
            software[key] = value
    return Identity(testbed=testbed, software=software)


def machine_part(testbed: Mapping[str, str]) -> dict[str, str]:
    """The testbed without what belongs to one item: the runner all items share."""
    return {k: v for k, v in testbed.items() if k not in _ITEM_KEYS}


def diff_testbeds(stored: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """One line per differing key: ``"gpu: stored 8 x H100, now 8 x H200"``.

    Keys present on one side only are included, with ``(absent)`` for the missing value.
    """
    lines = []
    for key in [*stored, *(k for k in current if k not in stored)]:
        a, b = stored.get(key), current.get(key)
        if a != b:
            lines.append(f"{key}: stored {'(absent)' if a is None else a}, now {'(absent)' if b is None else b}")
    return lines


def software_change(stored: Sequence[Mapping[str, str]], current: Mapping[str, str]) -> str:
    """What changed in the software under test since the stored runs, for messages:
    ``"vllm_version 0.11.0 -> 0.11.1"`` (``a/b -> c`` when the stored runs differ)."""
    changes = []
    keys = [*current, *(k for run in stored for k in run if k not in current)]
    for key in dict.fromkeys(keys):
        before = list(dict.fromkeys(run.get(key, "(absent)") for run in stored))
        after = current.get(key, "(absent)")
        if before and before != [after]:
            changes.append(f"{key} {'/'.join(before)} -> {after}")
    return ", ".join(changes)


def split_legacy_fingerprint(fingerprint: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """A schema-1 baseline's single fingerprint as (testbed, software), for reading old files."""
    testbed = {("measurement_version" if k == "fingerprint_version" else k): v for k, v in fingerprint.items()
               if k not in SOFTWARE_KEYS and k not in _IGNORED_KEYS}
    software = {k: v for k, v in fingerprint.items() if k in SOFTWARE_KEYS}
    return testbed, software


def host_facts() -> dict[str, str]:
    """The machine's hardware (testbed) and driver (software), for servers run on it.

    GPU model and count and the driver from ``nvidia-smi``; the CPU model, core count and
    memory from Linux's ``/proc``. Missing facts are left out.
    """
    facts: dict[str, str] = {}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            out = None
        rows = [[p.strip() for p in line.split(",")] for line in (out.stdout.splitlines() if out else []) if line]
        if rows:
            names = sorted({r[0] for r in rows})
            facts["gpu"] = f"{len(rows)} x {' + '.join(names)}"
            facts["driver_version"] = rows[0][-1]
            try:  # the CUDA version the driver supports is only in nvidia-smi's banner
                banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False)
                cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner.stdout)
                if cuda:
                    facts["cuda_version"] = cuda.group(1)
            except (OSError, subprocess.SubprocessError):
                pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if model:
            facts["cpu"] = model
    except OSError:
        pass
    facts["cpus"] = str(os.cpu_count() or 0)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), None)
        if kib:
            facts["memory_gib"] = str(round(kib / 2**20))
    except (OSError, ValueError):
        pass
    return facts
