"""The answers check (outputs.py): false alarms on honest runs, detection of a corrupting tier.

    python benchmarks/bench_answers.py                  # ~2 min on 2 cores
    python benchmarks/bench_answers.py --runs 40 --real-stack

Each run is what an item of the default shape does with the check on: a fresh emulator
(``--backend cpu``, ``--jitter``), 1k-token prompts, 16 output tokens, concurrency 4,
16 prompts, 2 trials of a cold, a warm and a control round, judged by
:func:`pytest_kvcache.outputs.check_outputs`. Printed:

1. honest runs (jitter on): the share that fail the check (false alarms) and the
   largest divergence seen, tier and control;
2. corrupting tiers (``--corrupt-rate``): the share of runs caught, by rate;
3. with ``--real-stack`` (the vLLM CPU build, LMCache, redis-server; see
   scripts/setup-real-stack.sh): the control's and the tier's divergence there, from a
   pytest run of the plugin itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pytest_kvcache.models import ScenarioCase  # noqa: E402
from pytest_kvcache.outputs import check_outputs, control_salt  # noqa: E402
from pytest_kvcache.runner import CaseRunner  # noqa: E402
from pytest_kvcache.servers._process import ManagedProcess, free_port  # noqa: E402

CASE = ScenarioCase(scenario="answers", path="bench", phase="prefill", case_id="cpu-1k-c4", backend="cpu",
                    input_len=1024, concurrency=4, output_len=16, num_prompts=16, dataset="random",
                    rounds=("cold", "warm"), measure_round="warm", trials=2, seed=0, api="completions",
                    request_rate=math.inf, thresholds=())

REAL_SCENARIO = """
name: answers
phase: prefill
matrix: {backend: [redis], input_len: [1k], concurrency: [4], output_len: [16]}
num_prompts: 8
rounds: [cold, warm]
trials: 2
thresholds: {median_ttft_ms: {direction: lower, threshold: 10%}}
"""


def one_run(run: int, workdir: Path, *emulator_args: str):
    """One honest or corrupting run on a fresh emulator: its OutputCheck."""
    port = free_port()
    process = ManagedProcess("emulator", [sys.executable, "-m", "pytest_kvcache.emulator", "--port", str(port),
                                          "--backend", "cpu", "--seed", str(run), "--log-level", "warning",
                                          *emulator_args],
                             log_path=workdir / f"emulator-{run}.log", health_url=f"http://127.0.0.1:{port}/health")
    process.start()
    try:
        trials = CaseRunner().run(CASE, f"http://127.0.0.1:{port}", "emulated-model", range(CASE.trials),
                                  control_salt=partial(control_salt, f"bench-{run}"))
    finally:
        process.stop()
    return check_outputs(CASE, "cpu", trials)


def real_stack(workdir: Path) -> dict:
    """The plugin's own run on the CPU stack: the item JSON's outputs section."""
    python, model = os.environ.get("KVCACHE_VLLM_PYTHON"), os.environ.get("KVCACHE_REAL_STACK_MODEL")
    if not python or not model:
        raise SystemExit("--real-stack needs KVCACHE_VLLM_PYTHON and KVCACHE_REAL_STACK_MODEL (see README)")
    project = workdir / "real"
    (project / "scenarios").mkdir(parents=True)
    (project / "scenarios" / "answers.yaml").write_text(REAL_SCENARIO)
    (project / "pytest.ini").write_text("[pytest]\n")
    subprocess.run([sys.executable, "-m", "pytest", "scenarios", f"--rootdir={project}", "-p", "no:cacheprovider",
                    "-q", "--kv-server", "vllm", "--model", model, "--tokenizer", model, "--kv-python", python,
                    "--kv-server-args=--enforce-eager --max-model-len 4096", "--kv-history=none",
                    "--kv-results-dir", "out", "--update-baselines", "--baseline-dir", "bl"],
                   cwd=project, check=False, timeout=1200)
    doc = json.loads((project / "out" / "answers" / "answers[redis].json").read_text())
    return doc["outputs"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="honest runs (default 20)")
    parser.add_argument("--jitter", type=float, default=0.1, help="the emulator's --jitter (default 0.1)")
    parser.add_argument("--rates", default="0.02,0.05,0.1,0.5", help="corrupt rates tried (default 0.02,0.05,0.1,0.5)")
    parser.add_argument("--corrupt-runs", type=int, default=5, help="runs per corrupt rate (default 5)")
    parser.add_argument("--real-stack", action="store_true", help="also run the plugin on the vLLM CPU stack")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        honest = [one_run(run, workdir, "--jitter", str(args.jitter)) for run in range(args.runs)]
        alarms = sum(c.failed for c in honest)
        print(f"honest runs (cpu tier, --jitter {args.jitter}, 16 prompts x 2 trials): {alarms} of {len(honest)} "
              f"failed the check ({alarms / len(honest):.0%}); largest divergence: tier "
              f"{max(c.tier['warm'].rate for c in honest):.1%}, control {max(c.control.rate for c in honest):.1%}")
        print("corrupting tier (--corrupt-rate F: that share of chunks stored with other bytes):")
        print(f"  {'rate':>6}  {'caught':>8}  {'warm answers differing (median)':>32}")
        for rate in (float(r) for r in args.rates.split(",")):
            checks = [one_run(1000 + run, workdir, "--corrupt-rate", str(rate)) for run in range(args.corrupt_runs)]
            rates = sorted(c.tier["warm"].rate for c in checks)
            print(f"  {rate:>6.2f}  {sum(c.failed for c in checks):>3} of {len(checks):<2}  "
                  f"{rates[len(rates) // 2]:>32.0%}")
        if args.real_stack:
            outputs = real_stack(workdir)
            tier, control = outputs["tier"]["warm"], outputs["control"]
            print(f"vLLM CPU stack (LMCache MP, redis tier, 8 prompts x 2 trials): check {outputs['status']}; tier "
                  f"{tier['differing']} of {tier['compared']} answers differ, control {control['differing']} of "
                  f"{control['compared']}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
