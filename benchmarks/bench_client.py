"""How exact is the load generator? Measure it against a server with known timings.

Starts ``python -m pytest_kvcache.testing.reference_server`` (fixed TTFT and inter-token gap,
with its own per-request stamps in ``server_timing``), runs ``loadgen.run_round`` at
concurrency 16, 128 and 512, and prints, per concurrency, the client's TTFT and ITL
error against the server's truth for each request, split into the send side (client
start stamp -> server arrival stamp) and the receive side (server write stamp -> client
arrival stamp), the event-loop lag, the delivered concurrency and whether the round's
guard called it valid. Each level runs once per stamping mode (``--stamps``): the
kernel's receive time (what the plugin uses on plain HTTP on Linux) and ``perf_counter``
when Python handles the read (what it falls back to elsewhere), the same prompts one
after the other. Then it looks for the highest streamed-chunk rate the client sustains
before its guard trips (1 ms gaps, rising concurrency).
``benchmarks/bench_vs_vllm.py`` runs the same measurements beside ``vllm bench serve``.

    python benchmarks/bench_client.py [--quick] [--levels 16,128,512] [--stamps kernel,user]
        [--client-processes N]

Both processes share the machine: on 2 cores the server takes one and the client one.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path and not os.environ.get("BENCH_NO_ROOT"):
    sys.path.insert(0, str(ROOT))

from pytest_kvcache import loadgen
from pytest_kvcache.emulator.tokenizer import get_tokenizer
from pytest_kvcache.testing import ReferenceServer, start_reference_server
from pytest_kvcache.workloads import Prompt

MODEL = "reference-model"


def start_server(tmp: Path, ttft_ms: float, itl_ms: float, *extra: str) -> tuple[ReferenceServer, str]:
    server = start_reference_server(tmp, "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms), *extra, model=MODEL,
                                    name="reference server")
    return server, server.url


def make_prompts(n: int, input_len: int, output_len: int, seed: int = 0) -> list[Prompt]:
    tok = get_tokenizer()
    rng = random.Random(seed)
    lo, hi = tok.num_special, tok.vocab_size
    return [Prompt(tok.decode([rng.randrange(lo, hi) for _ in range(input_len)]), input_len, output_len)
            for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


_CAPTURES = "server_timings" in inspect.signature(loadgen.run_round).parameters
_STAMP_CHOICE = "kernel_stamps" in inspect.signature(loadgen.open_pool).parameters


async def one_level(url: str, concurrency: int, prompts: list[Prompt], ttft_ms: float, itl_ms: float,
                    stamps: str = "kernel", processes: int = 1, **spec_kw) -> dict:
    spec = loadgen.LoadSpec(model=MODEL, max_concurrency=concurrency, timeout_s=60, **spec_kw)
    timings: dict = {}
    warmup = prompts[: min(len(prompts), concurrency)]
    if processes > 1:  # the round spread over client processes (pytest_kvcache.spread)
        from pytest_kvcache.spread import ClientProcesses

        clients = ClientProcesses(url, concurrency, processes, kernel_stamps=stamps == "kernel")
        try:
            await clients.run_round(spec, warmup, "warmup")
            result = await clients.run_round(spec, prompts, "measure", server_timings=timings)
        finally:
            clients.close()
        stamps = result.client_stamps
    else:
        pool = (loadgen.open_pool(url, concurrency, kernel_stamps=stamps == "kernel") if _STAMP_CHOICE
                else loadgen.open_pool(url, concurrency))
        stamps = "kernel" if getattr(pool, "kernel_stamps", False) else "user"
        try:
            await loadgen.run_round(pool, spec, warmup, "warmup")
            kw = {"server_timings": timings} if _CAPTURES else {}
            result = await loadgen.run_round(pool, spec, prompts, "measure", **kw)
        finally:
            pool.close()
    ttft_err, itl_err, send, recv, server_late = [], [], [], [], []
    for r in result.records:
        if not r.success:
            continue
        st = timings.get(r.index)
        if st is None:  # a client that cannot hand the server's stamps back: compare with the settings
            ttft_err.append(r.ttft * 1e3 - ttft_ms)
            itl_err.extend(g * 1e3 - itl_ms for g in r.itls)
            continue
        a, chunks = st["arrival_perf_s"], st["chunk_perf_s"]
        ttft_err.append((r.ttft - (chunks[0] - a)) * 1e3)
        send.append((a - r.start) * 1e3)
        recv.extend((c - s) * 1e3 for c, s in zip(r.chunk_times, chunks))
        # the server's own schedule: chunk k due at arrival + ttft + k*itl
        server_late.extend((c - a) * 1e3 - ttft_ms - k * itl_ms for k, c in enumerate(chunks))
        itl_err.extend((c - s) * 1e3 for c, s in zip(r.itls, (b - x for x, b in itertools.pairwise(chunks))))
    s = result.summary
    return {
        "concurrency": concurrency, "stamps": stamps, "processes": processes,
        "n": len(result.records), "failed": result.failed,
        "ttft_med": statistics.median(ttft_err) if ttft_err else float("nan"), "ttft_p99": pct(ttft_err, 99),
        "itl_med": statistics.median(itl_err) if itl_err else float("nan"), "itl_p99": pct(itl_err, 99),
        "client_median_ttft": s.get("median_ttft_ms"), "client_median_itl": s.get("median_itl_ms"),
        "send_med": statistics.median(send) if send else float("nan"), "send_p99": pct(send, 99),
        "recv_med": statistics.median(recv) if recv else float("nan"), "recv_p99": pct(recv, 99),
        "lag_p99": s.get("loop_lag_p99_ms", result.max_loop_lag_ms),
        "conc_ratio": s.get("concurrency_ratio"),
        "server_late_med": statistics.median(server_late) if server_late else float("nan"),
        "server_late_p99": pct(server_late, 99),
        "chunks_per_s": sum(len(r.chunk_times) for r in result.records) / result.duration,
        "output_throughput": s.get("output_throughput"),
        "valid": result.invalid_reason is None, "reason": result.invalid_reason,
    }


def print_table(rows: list[dict]) -> None:
    print(f"{'conc':>5} {'stamps':>6} {'procs':>5} {'n':>5} {'TTFT err med/p99 ms':>20} {'ITL err med/p99 ms':>19} "
          f"{'send med/p99':>13} {'recv med/p99':>13} {'lag p99':>8} {'conc':>5} {'valid':>5}")
    for r in rows:
        ratio = "-" if r["conc_ratio"] is None else f"{r['conc_ratio']:.2f}"
        print(f"{r['concurrency']:>5} {r['stamps']:>6} {r['processes']:>5} {r['n']:>5} "
              f"{r['ttft_med']:>9.3f} / {r['ttft_p99']:<8.3f} "
              f"{r['itl_med']:>8.3f} / {r['itl_p99']:<8.3f} {r['send_med']:>5.2f} / {r['send_p99']:<5.2f} "
              f"{r['recv_med']:>5.2f} / {r['recv_p99']:<5.2f} {r['lag_p99']:>8.2f} {ratio:>5} "
              f"{'yes' if r['valid'] else 'NO':>5}")
        if not r["valid"]:
            print(f"      invalid: {r['reason']}")
        if r["failed"]:
            print(f"      {r['failed']} failed requests")


async def accuracy(url: str, levels: list[int], quick: bool, stamp_modes: list[str], processes: int) -> list[dict]:
    rows = []
    for c in levels:
        n = max(2 * c, 64) if not quick else max(c, 32)
        prompts = make_prompts(n, 256, 32, seed=c)
        for stamps in stamp_modes:  # the same prompts, one mode after the other
            rows.append(await one_level(url, c, prompts, 40.0, 8.0, stamps=stamps))
        if processes > 1:
            rows.append(await one_level(url, c, prompts, 40.0, 8.0, processes=processes))
    return rows


async def chunk_rate(url: str, quick: bool, processes: int) -> list[dict]:
    rows = []
    for c in (8, 16, 24, 32, 48, 64, 96, 128) if not quick else (16, 64):
        prompts = make_prompts(2 * c, 64, 128, seed=1000 + c)
        row = await one_level(url, c, prompts, 10.0, 1.0, processes=processes)
        rows.append(row)
        if not row["valid"] or abs(row["itl_med"]) >= 0.25:
            break
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--levels", default="16,128,512")
    ap.add_argument("--stamps", default="kernel,user",
                    help="how the client stamps reads, one accuracy row per mode: kernel (the kernel's receive "
                         "time, the default where available) and/or user (perf_counter when Python gets the read)")
    ap.add_argument("--client-processes", type=int, default=1, metavar="N",
                    help="also measure each accuracy level with the round spread over N client processes, and "
                         "run the chunk-rate ladder that way (pytest_kvcache.spread; default 1: one process)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    stamp_modes = [m for m in args.stamps.split(",") if m]
    if not stamp_modes or set(stamp_modes) - {"kernel", "user"}:
        ap.error(f"--stamps {args.stamps!r}: use kernel, user or kernel,user")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        tmp_path = Path(tmp)
        server, url = start_server(tmp_path, 40, 8)
        try:
            print("client accuracy against the reference server (TTFT 40 ms, ITL 8 ms, 32 output tokens, "
                  "256-token prompts); errors = client - server truth per request, ms"
                  + ("" if _CAPTURES else "; this client cannot capture server_timing: errors vs settings"))
            rows = asyncio.run(accuracy(url, levels, args.quick, stamp_modes, args.client_processes))
            print_table(rows)
        finally:
            server.stop()
        server, url = start_server(tmp_path, 10, 1)
        try:
            print("\nstreamed-chunk rate (TTFT 10 ms, ITL 1 ms, 128 output tokens), raising concurrency "
                  "until the guard trips")
            rate_rows = asyncio.run(chunk_rate(url, args.quick, args.client_processes))
            print_table(rate_rows)
            # sustained: the guard passed and chunks were still told apart (median ITL error
            # under a quarter of the 1 ms gap; reads that pile chunks up read as 0 ms gaps)
            valid = [r for r in rate_rows if r["valid"] and abs(r["itl_med"]) < 0.25]
            for r in rate_rows:
                print(f"  c={r['concurrency']}: {r['chunks_per_s']:,.0f} chunks/s delivered"
                      f"{'' if r['valid'] else ' (invalid)'}; client median ITL {r['client_median_itl']:.3f} ms, "
                      f"median ITL error {r['itl_med']:.3f} ms")
            if valid:
                best = max(valid, key=lambda r: r["chunks_per_s"])
                print("highest sustained streamed-chunk rate (valid round, |median ITL error| < 0.25 ms): "
                      f"{best['chunks_per_s']:,.0f} "
                      f"chunks/s (c={best['concurrency']})")
            else:
                print("no valid round in the chunk-rate sweep")
        finally:
            server.stop()
    print(f"(benchmark took {time.monotonic() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": rows, "chunk_rate": rate_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
