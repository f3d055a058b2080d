"""benchmarks/bench_vs_vllm.py runs end to end: both clients' figures printed, exit status 0.

Only the shape of the output is checked, never a timing (speed targets are the
benchmark's printed figures). The tiny configuration takes about 20-30 s on 2 cores,
most of it two starts of vLLM's interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_vs_vllm.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=170,
                          check=False)


def figure_rows(out: str, header: str) -> list[str]:
    """The table rows (lines starting with a concurrency) after the line starting with ``header``."""
    lines = out[out.index(header):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.split() or not line.split()[0].isdigit():
            break
        rows.append(line)
    return rows


def test_tiny_run_prints_both_clients(real_stack) -> None:
    done = run_script("--vllm-python", real_stack.python, "--tokenizer", real_stack.model, "--concurrency", "4",
                      "--rate-concurrency", "4", "--rate-output-len", "32", "--min-prompts", "8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for header in ("accuracy:", "chunk rate:"):
        (row,) = figure_rows(out, header)
        assert row.split()[0] == "4"
        assert "nan" not in row, row  # both clients gave figures
    assert "TTFT vllm" in out and "vllm tok/s" in out
    assert "highest rate kept up, server on schedule: ours" in out
    assert "load average" in out


def test_missing_vllm_interpreter_names_it_and_the_fix(tmp_path) -> None:
    missing = tmp_path / "no-venv" / "bin" / "python"
    done = run_script("--vllm-python", str(missing))
    assert done.returncode != 0
    assert str(missing) in done.stderr
    assert "--vllm-python" in done.stderr and "scripts/setup-real-stack.sh" in done.stderr
