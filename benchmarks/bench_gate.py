"""The nightly gate's error rates on synthetic nights (Monte Carlo), the full grid.

    python benchmarks/bench_gate.py               # ~6 min on 2 cores
    python benchmarks/bench_gate.py --sessions 500 --quick

Every session is the default suite's shape: 23 items x (median TTFT, 10% threshold;
total throughput, 5%) = 46 comparisons, 3 trials per run, trial noise 1%, decided as a
run of the plugin decides (:func:`pytest_kvcache.simulate.simulate_gate`: run-level
comparison, noise pooled over the items, one confirmation run, Holm). Printed:

1. the share of sessions that fail with no change at all (false failures), by
   run-to-run noise, baseline runs and noise shape; beside it the previous gate (the
   baseline's trials pooled and compared as independent, Welch t, Holm) on the same draws;
2. the share of sessions that find one item's TTFT regression (power), by size;
3. both on a suite where three items are noisier than the other twenty (run sd 1%).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import stats as st  # noqa: E402

from pytest_kvcache.simulate import GateSetup, NoiseModel, _draw_sessions, _holm, simulate_gate  # noqa: E402
from pytest_kvcache.stats import threshold_log  # noqa: E402

MODELS = {
    "normal": {},
    "t, 3 df": {"tail_df": 3.0},
    "half a night": {"night_share": 0.5},
    "every item at once": {"night_share": 1.0},
}


def trials_pooled_gate(noise: NoiseModel, setup: GateSetup, sessions: int, seed: int) -> float:
    """The gate before runs were the unit: every baseline trial pooled, Welch on logs, Holm."""
    base, cur = _draw_sessions(noise, setup, sessions, seed, {})
    x = np.log(base).reshape(sessions, setup.comparisons, -1)
    y = np.log(cur[:, :, 0])
    sign = np.tile([1.0, -1.0], setup.items)
    t = st.ttest_ind(y, x, axis=-1, equal_var=False)
    p = np.where(sign > 0, st.t.sf(t.statistic, t.df), st.t.cdf(t.statistic, t.df))
    worse = (y.mean(-1) - x.mean(-1)) * sign
    thresholds = np.array([threshold_log(0.10, "lower"), threshold_log(0.05, "higher")] * setup.items)
    return float(((_holm(p) <= setup.alpha) & (worse > thresholds)).any(-1).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="fewer grid points")
    args = parser.parse_args()
    sds = (0.0, 0.02, 0.05) if args.quick else (0.0, 0.01, 0.02, 0.03, 0.04, 0.05)
    runs = (1, 3, 5) if args.quick else (1, 2, 3, 5, 10)
    started = time.perf_counter()
    print(f"False failures: share of {args.sessions} sessions (46 comparisons each, no change) that fail.")
    print("ours / the trials-pooled gate; [items confirmed per session]")
    header = "noise shape          runs  " + "  ".join(f"run sd {sd:4.0%}".ljust(22) for sd in sds)
    print(header)
    for name, shape in MODELS.items():
        for r in runs:
            cells = []
            for i, sd in enumerate(sds):
                noise, setup = NoiseModel(run_sd=sd, **shape), GateSetup(baseline_runs=r)
                seed = 1000 * r + i
                ours = simulate_gate(noise, setup, sessions=args.sessions, seed=seed)
                old = trials_pooled_gate(noise, setup, args.sessions, seed)
                cells.append(f"{ours.false_failure_rate:5.1%} / {old:5.1%} [{ours.confirmations:.1f}]".ljust(22))
            print(f"{name:<20} {r:>4}  " + "  ".join(cells), flush=True)
    print()
    print("Power: share of sessions in which one item's TTFT regression fails the gate (normal run noise).")
    effects = (1.10, 1.15, 1.20, 1.30)
    print("run sd  runs  " + "  ".join(f"+{e - 1:.0%}".ljust(7) for e in effects))
    for sd in (0.01, 0.02, 0.03, 0.05):
        for r in (3, 5, 10):
            cells = [f"{simulate_gate(NoiseModel(run_sd=sd), GateSetup(baseline_runs=r), sessions=args.sessions, seed=7, effects={0: e}).fail_rate[0]:6.1%}"  # noqa: E501
                     for e in effects]
            print(f"{sd:5.0%}  {r:>4}  " + "  ".join(cells), flush=True)
    print()
    print("Three items noisier than the rest (run sd 1%): false failures / a quiet item's +15% found.")
    noisy_sds = (0.03, 0.05, 0.08)
    print("runs  " + "  ".join(f"noisy sd {sd:2.0%}".ljust(16) for sd in noisy_sds))
    for r in (3, 5, 10):
        cells = []
        for sd in noisy_sds:
            result = simulate_gate(NoiseModel(run_sd=0.01, noisy_items=3, noisy_sd=sd), GateSetup(baseline_runs=r),
                                   sessions=args.sessions, seed=r, effects={0: 1.15})
            cells.append(f"{result.false_failure_rate:5.1%} / {result.fail_rate[0]:5.1%}".ljust(16))
        print(f"{r:>4}  " + "  ".join(cells), flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
