"""The real stack (vLLM CPU build + LMCache + a tiny model), built by scripts/setup-real-stack.sh.

Absent, these tests skip with a message; with ``KVCACHE_REAL_STACK=1`` (CI) absence is
a failure. Paths: ``KVCACHE_VLLM_PYTHON`` and ``KVCACHE_REAL_STACK_MODEL``, else
``.real-stack/venv/bin/python`` and ``.real-stack/model`` under the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RealStack:
    python: str
    model: str


def _find() -> tuple[RealStack | None, str]:
    python = Path(os.environ.get("KVCACHE_VLLM_PYTHON") or ROOT / ".real-stack" / "venv" / "bin" / "python")
    model = Path(os.environ.get("KVCACHE_REAL_STACK_MODEL") or ROOT / ".real-stack" / "model")
    if not python.is_file():
        return None, f"no vLLM interpreter at {python}"
    if not (model / "config.json").is_file() or not (model / "tokenizer.json").is_file():
        return None, f"no tiny model at {model}"
    check = subprocess.run([str(python), "-c", "import vllm, lmcache"], capture_output=True, text=True,
                           timeout=120, check=False)
    if check.returncode != 0:
        return None, f"{python} cannot import vllm and lmcache: {check.stderr.strip().splitlines()[-1:]}"
    return RealStack(python=str(python), model=str(model)), ""


@pytest.fixture(scope="session")
def real_stack() -> RealStack:
    stack, why = _find()
    if stack is None:
        message = f"real stack absent ({why}); build it with scripts/setup-real-stack.sh"
        if os.environ.get("KVCACHE_REAL_STACK") == "1":
            pytest.fail(message + " (KVCACHE_REAL_STACK=1: required here)", pytrace=False)
        pytest.skip(message)
    return stack


def _two_round_scenario(name: str, backends: list[str], *, output_len: int, num_prompts: int, trials: int,
                        extra: str = "") -> str:
    """A scenario of a cold and a warm round, 2,000-token random prompts at concurrency 1
    (a slot never waits: no client guard to trip on a busy runner)."""
    return (f"name: {name}\nphase: prefill\nmatrix:\n  backend: [{', '.join(backends)}]\n  input_len: [2k]\n"
            f"  concurrency: [1]\n  output_len: [{output_len}]\ndataset: random\nnum_prompts: {num_prompts}\n"
            f"rounds: [cold, warm]\nmeasure: warm\ntrials: {trials}\nseed: 0\napi: completions\n{extra}")


@pytest.fixture
def two_round_scenario():
    """A function writing a cold-and-warm scenario's YAML (see :func:`_two_round_scenario`)."""
    return _two_round_scenario


@pytest.fixture
def stack_processes():
    """A function listing the processes of a real stack now (to check for leftovers)."""
    return _stack_processes


@pytest.fixture
def no_leftovers(stack_processes):
    """The test leaves no process of a real stack behind (within 15 s of its end)."""
    before = stack_processes()
    yield
    deadline = time.monotonic() + 15
    while True:
        left = stack_processes() - before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"processes left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def redis_server_available() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server not installed (apt-get install -y redis-server)"
        if os.environ.get("KVCACHE_REAL_STACK") == "1":
            pytest.fail(message + " (KVCACHE_REAL_STACK=1: required here)", pytrace=False)
        pytest.skip(message)
    return path


def _stack_processes() -> set[tuple[int, str]]:
    """Processes that belong to a real stack: vLLM, LMCache's server, redis-server."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=False).stdout
    found = set()
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if any(mark in args for mark in ("vllm.entrypoints", "lmcache server", "lmcache.v1.server",
                                         "redis-server 127.0.0.1", "redis-server *:", "EngineCore")):
            found.add((int(pid), args[:120]))
    return found
