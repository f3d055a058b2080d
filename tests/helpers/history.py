"""Seeded run histories, concurrent writers and the history command: what the SQLite and
PostgreSQL store tests share."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pytest_kvcache.decision import Zone
from pytest_kvcache.history import ItemRun

TESTBED = {"gpu": "H100", "model": "llama-8b", "labels": "bandwidth=400Gbps"}
OTHER_TESTBED = {"gpu": "A100", "model": "llama-8b", "labels": "bandwidth=400Gbps"}
PREFILL = "seed_prefill/prefill[cpu-10k-c16]"
DECODE = "seed_decode/decode[none-1k-c8]"
METRICS = (("median_ttft_ms", "lower"), ("total_token_throughput", "higher"))
NOW = datetime.now(timezone.utc).replace(microsecond=0)
CHANGE_AT = 18  # the seeded store's first session after the change
SESSIONS = 30


def make_run(session: str, item: str = PREFILL, *, time: str = "2024-05-01T02:00:00Z", attempt: int = 0,
             ttft: tuple[float, ...] = (100.0, 101.0), throughput: tuple[float, ...] | None = None,
             testbed: dict | None = None, software: dict | None = None, commit: str | None = "a" * 40,
             metrics: tuple = METRICS) -> ItemRun:
    throughput = throughput or tuple(1000.0 - 10 * i for i in range(len(ttft)))  # 1000, 990, ...
    trials = tuple({"index": i, "usable": True, "summary": {"median_ttft_ms": t, "total_token_throughput": x}}
                   for i, (t, x) in enumerate(zip(ttft, throughput, strict=True)))
    return ItemRun(session_id=session, time=time, item=item, attempt=attempt, testbed=testbed or TESTBED,
                   software=software or {"vllm": "0.6.1", "lmcache": "0.1.3"}, commit=commit,
                   baseline_updated=attempt == 0, status="compared", zone=Zone.PASS, metrics=metrics, trials=trials)


def session_time(s: int) -> str:
    return (NOW - timedelta(days=SESSIONS - s)).isoformat().replace("+00:00", "Z")


def seeded_runs() -> list[ItemRun]:
    """30 nightly sessions: PREFILL's TTFT steps up 25% at session 18 with vLLM 0.6.2; its
    throughput, DECODE, and PREFILL on another testbed stay flat (2% noise)."""
    rng = random.Random(7)
    runs = []
    for s in range(SESSIONS):
        software = {"vllm": "0.6.1" if s < CHANGE_AT else "0.6.2", "lmcache": "0.1.3"}
        for session, item, testbed, ttft in (
                (f"session-{s:02d}", PREFILL, TESTBED, 100.0 if s < CHANGE_AT else 125.0),
                (f"session-{s:02d}", DECODE, TESTBED, 40.0),
                (f"runner2-{s:02d}", PREFILL, OTHER_TESTBED, 300.0)):  # another runner's sessions
            runs.append(make_run(session, item, time=session_time(s), testbed=testbed, software=software,
                                 commit=f"{s:02d}" + "c" * 38,
                                 ttft=tuple(ttft * rng.gauss(1, 0.02) for _ in range(5)),
                                 throughput=tuple(1000 * rng.gauss(1, 0.02) for _ in range(5))))
    return runs


def history_cmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_kvcache", "history", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


# --- concurrent writers ---------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from pytest_kvcache.decision import Zone
from pytest_kvcache.history import ItemRun, open_history
url, writer, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
while not go.exists():
    time.sleep(0.001)
new = 0
with open_history(url, rootdir=Path.cwd()) as store:  # a fresh store: the schema is created by whoever is first
    for s in range(SESSIONS):
        # writers 2k and 2k+1 both record sessions "shared-k-s": overlapping sessions, as when an
        # import runs beside the session that wrote the folder
        runs = [ItemRun(session_id=session, time=f"2024-05-01T02:{s % 60:02d}:00Z", item=f"item-{i}", attempt=0,
                        testbed={"gpu": "H100"}, software={"vllm": "0.6.1"}, commit=None, baseline_updated=False,
                        status="compared", zone=Zone.PASS, metrics=(("median_ttft_ms", "lower"),),
                        trials=tuple({"index": t, "usable": True, "summary": {"median_ttft_ms": 100.0 + t}}
                                     for t in range(5)))
                for session in (f"own-{writer}-{s}", f"shared-{writer // 2}-{s}") for i in range(ITEMS)]
        new += store.record(runs)
print(new)
"""


def run_writers(url: str, writers: int, sessions: int, items: int, cwd: Path) -> list[int]:
    go = cwd / f"go-{time.monotonic_ns()}"
    code = WRITER.replace("SESSIONS", str(sessions)).replace("ITEMS", str(items))
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(w), str(go)], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(writers)]
    time.sleep(1.0)  # every interpreter started and waiting
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    return [int(out) for out, _ in outs]


def expected_keys(writers: int, sessions: int, items: int) -> set[tuple[str, str]]:
    own = {(f"own-{w}-{s}", f"item-{i}") for w in range(writers) for s in range(sessions) for i in range(items)}
    return own | {(f"shared-{w // 2}-{s}", f"item-{i}") for w in range(writers) for s in range(sessions)
                  for i in range(items)}
