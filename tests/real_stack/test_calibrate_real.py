"""``python -m pytest_kvcache calibrate`` against the real stack: vLLM's CPU build with
LMCache's multi-process CPU offload, started by the command itself (about 3 minutes: 12
prompts per length and round, as LMCache's warm rounds on 2 shared cores are noisy).

The issue's target: the profile fitted to this server predicts its median TTFT at
held-out input lengths within 15%, and so does an emulator running that profile.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

TOLERANCE = 0.15


def calibrate(real_stack, tmp_path, attempt: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest_kvcache", "calibrate", "--kv-server", "vllm", "--model", real_stack.model,
         "--kv-python", real_stack.python, "--kv-server-args", "--enforce-eager --max-model-len 8192",
         "--backend", "cpu", "--prompts", "12", "--seed", str(attempt), "-o", str(tmp_path / "cpu-stack.json"),
         "--work-dir", str(tmp_path / f"work-{attempt}")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)


def test_profile_fitted_to_the_cpu_stack_predicts_held_out_lengths(real_stack, tmp_path, stack_processes):
    before = stack_processes()
    # A timing measurement on 2 shared cores: one more attempt (new prompts) if a
    # neighbour's burst spoiled the first; the command itself never relaxes the tolerance.
    for attempt in range(2):
        proc = calibrate(real_stack, tmp_path, attempt)
        print(proc.stdout[-3000:])
        if proc.returncode != 1:
            break
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    data = json.loads(tmp_path.joinpath("cpu-stack.json").read_text())
    calibration = data["calibration"]
    assert calibration["server"]["server"] == "vllm" and calibration["server"]["kv_mode"] == "mp"
    checks = {(c["input_len"], c["round"]): c for c in calibration["checks"]}
    assert set(checks) == {(1900, "cold"), (1900, "warm"), (3700, "cold"), (3700, "warm")}
    for check in checks.values():
        assert check["predicted_error"] <= TOLERANCE and check["emulated_error"] <= TOLERANCE, check
    profile = data["profile"]
    assert profile["kv_bytes_per_token"] == 2 * 2 * 64 * 2 * 2  # the tiny model: 2 layers x 2 KV heads x 64, bf16
    assert profile["prefill_ms_per_token_sq"] > 0 and profile["bandwidth_gbps"]["cpu"] > 0
    deadline = time.monotonic() + 15  # a process group may take a moment to be reaped
    while (left := stack_processes() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"calibrate left server processes behind: {sorted(left)}"
