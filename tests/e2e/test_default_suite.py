"""The committed baselines travel: the default scenarios at 10k tokens, on whatever machine
runs this, against the baselines in the repository (recorded elsewhere), pass the gate
with every median near its baseline, and keep the seeds' shape (seed 001: warm TTFT
cpu < disk < no offload)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_baselines_pass_here_and_keep_the_seed_shape(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "scenarios/seed_prefill.yaml",
                           "--input-len", "10k", f"--kv-results-dir={out}", "--kv-history=none", "--strict-baselines"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    warm = {}
    for backend in ("none", "cpu", "disk", "gds"):
        doc = json.loads((out / "seed_prefill" / f"prefill[{backend}-10k-c16].json").read_text())
        for c in doc["verdict"]["comparisons"]:
            assert c["test"].startswith("run-level") and c["runs_baseline"] >= 3, c
            # the emulator's timing model does not depend on the host: within 1-4% on an idle one; a CI
            # runner shared with other jobs read a throughput 11% low (the gate's confirmation run
            # cleared it), so the bound is on what a broken timing model would show
            assert abs(c["change_pct"]) < 25.0, (backend, c["metric"], c["change_pct"])
            assert c["verdict"]["zone"] != "FAIL"
        warm[backend] = doc["median_ttft_ms"]
    assert warm["cpu"] < warm["gds"] < warm["disk"] < warm["none"], warm
    assert 0.45 < warm["cpu"] / warm["none"] < 0.60 and 0.52 < warm["disk"] / warm["none"] < 0.67, warm
