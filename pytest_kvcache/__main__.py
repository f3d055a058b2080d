"""pytest-kvcache's command line: ``compare`` run folders, ``calibrate`` an emulator profile.

``python -m pytest_kvcache compare DIR...``: one CSV, plots and the Pareto frontier over many runs.

Replaces the seed's ``compare_offloading.py`` (CSV over every result folder, the media
and network comparisons) and ``plot_pareto.py`` (scatter with the Pareto frontier)::

    python -m pytest_kvcache compare kvcache-results/ --phase prefill -o media-compare
    python -m pytest_kvcache compare run-a run-b run-c --modality GDS --direction east-west

Each DIR is a run folder (what ``--kv-results-dir`` wrote) or a folder of run folders.

``python -m pytest_kvcache calibrate``: measure a real server's TTFT over input lengths
(cold, and warm where it has an offload tier), fit an emulator profile to it and check
it on held-out lengths (see :mod:`pytest_kvcache.calibrate`)::

    python -m pytest_kvcache calibrate --kv-server vllm --model .real-stack/model \
        --kv-python .real-stack/venv/bin/python --backend cpu -o cpu-stack.json
    pytest --emulator-profile cpu-stack.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]

_FILTERS = (
    ("phase", "phase", "PHASE", "scenario phase, e.g. prefill"),
    ("backend", "kvcache", "NAME", "offload backend, e.g. none, cpu, disk, gds"),
    ("modality", "modality", "MEDIUM", "storage medium: HBM, CPU, 'Local Disk', GDS, Redis, ..."),
    ("bandwidth", "bandwidth", "BW", "bandwidth label, e.g. 400Gbps"),
    ("direction", "direction", "DIR", "direction label, e.g. east-west, north-south"),
    ("arcc", "arcc", "VALUE", "ARCC label, e.g. on, off"),
    ("input_len", "input_len", "LEN", "input length: 100, 1k, 10k, 100k"),
)


def _values(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give one value or a comma list")
    return values


def _token_values(text: str) -> list[str]:
    from .scenarios import TOKEN_COUNT_FORMS, parse_token_count

    values = _values(text)
    for v in values:
        try:
            parse_token_count(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r}: use {TOKEN_COUNT_FORMS}") from None
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_kvcache",
                                     description="pytest-kvcache tools: compare result folders, calibrate the "
                                                 "emulator")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmp_ = sub.add_parser(
        "compare", help="combine run folders: one CSV, plots, the TTFT/throughput Pareto frontier",
        description="Read many run folders (what --kv-results-dir wrote, or folders of them), keep the rows "
                    "that pass the filters, and write the combined CSV (the seed's columns first), the "
                    "plots and the Pareto frontier, which is also printed. Filters take comma lists and may "
                    "be repeated; matching ignores case.")
    cmp_.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run folder, or a folder of run folders")
    cmp_.add_argument("-o", "--out", type=Path, default=Path("kvcache-compare"), metavar="OUT",
                      help="output folder (default: kvcache-compare)")
    for name, _col, metavar, text in _FILTERS:
        cmp_.add_argument(f"--{name.replace('_', '-')}", dest=name, action="append", default=[],
                          type=_token_values if name == "input_len" else _values, metavar=metavar,
                          help=f"keep rows of this {text}")
    cmp_.add_argument("--per-trial", action="store_true",
                      help="one row per item, run and trial (default: one row per item and run, usable "
                           "trials pooled as in the item JSON's top level)")
    cmp_.add_argument("--x", default="mean_ttft_ms", metavar="COLUMN",
                      help="Pareto x axis, lower is better (default mean_ttft_ms)")
    cmp_.add_argument("--y", default="total_token_throughput", metavar="COLUMN",
                      help="Pareto y axis, higher is better (default total_token_throughput)")
    cmp_.add_argument("--xmax", type=float, default=None, metavar="X", help="right end of the Pareto plot's x axis")
    cmp_.add_argument("--no-plots", action="store_true", help="write the CSV files only")
    _calibrate_parser(sub)
    return parser


def _token_list(text: str) -> tuple[int, ...]:
    from .scenarios import TOKEN_COUNT_FORMS, parse_token_count

    try:
        return tuple(parse_token_count(v) for v in _values(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {TOKEN_COUNT_FORMS}") from None


def _fraction(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%")) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction such as 0.15 or a percentage such as 15%") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 0 and 100%")
    return value


def _calibrate_parser(sub) -> None:
    cal = sub.add_parser(
        "calibrate", help="fit an emulator profile to a real server's TTFT and check it on held-out lengths",
        description="Measure a real server's median TTFT over input lengths at concurrency 1 (a cold round; "
                    "with --backend, a warm round that loads from the tier), and its ITL; fit the emulator's "
                    "cost model; check the fit and an emulator running it on held-out lengths. A profile "
                    "within --tolerance is written to --out (use it with --emulator-profile FILE); one beyond "
                    "it to OUT.rejected.json, with exit status 1.")
    where = cal.add_argument_group("the server")
    where.add_argument("--kv-server", choices=("external", "vllm"), default=None,
                       help="start a real vLLM (vllm) or measure a running one (external, with --kv-endpoint); "
                            "default: external when --kv-endpoint is given, else vllm")
    where.add_argument("--kv-endpoint", default=None, metavar="URL",
                       help="the running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", default=None, help="served model (vllm: the model folder or name to serve)")
    where.add_argument("--kv-python", default=None, metavar="PATH", help="interpreter with vLLM and LMCache (vllm)")
    where.add_argument("--kv-server-args", default="", metavar="ARGS",
                       help="extra vllm serve arguments as one shell string, e.g. '--max-model-len 8192'")
    where.add_argument("--kv-ready-timeout", type=float, default=300.0, metavar="S",
                       help="seconds a started server may take to answer /health (default 300)")
    where.add_argument("--backend", default="none",
                       help="the server's offload tier: none (cold only), cpu, disk, gds or redis (default none)")
    where.add_argument("--tokenizer", default=None, metavar="PATH",
                       help="tokenizer.json or model folder (default: the --model folder if it has one, else "
                            "the server's /tokenize)")
    what = cal.add_argument_group("what to measure")
    what.add_argument("--input-lens", type=_token_list, default=(300, 600, 1200, 2500, 5000, 7500), metavar="LENS",
                      help="fitted input lengths (default 300,600,1.2k,2.5k,5k,7.5k; not multiples of the chunk)")
    what.add_argument("--holdout", type=_token_list, default=(1900, 3700), metavar="LENS",
                      help="held-out input lengths, measured and checked, never fitted (default 1.9k,3.7k: like "
                           "the fitted ones, a warm request's uncached tail of ~100 tokens)")
    what.add_argument("--prompts", type=int, default=8, help="prompts per length and round (default 8)")
    what.add_argument("--passes", type=int, default=2,
                      help="measure each length's prompts in this many passes, up the lengths then down, so a "
                           "machine drifting slower slows every length alike (default 2)")
    what.add_argument("--output-len", type=int, default=4, help="output tokens of the TTFT rounds (default 4)")
    what.add_argument("--decode-concurrency", type=int, default=8,
                      help="concurrency of the second decode round (default 8)")
    what.add_argument("--chunk-size", type=int, default=256, help="LMCache's chunk size in tokens (default 256)")
    what.add_argument("--seed", type=int, default=0)
    fit = cal.add_argument_group("the profile")
    fit.add_argument("--model-config", default=None, metavar="PATH",
                     help="the model's config.json, for its KV bytes per token (default: the --model folder's)")
    fit.add_argument("--kv-bytes-per-token", type=int, default=None, metavar="N", help="instead of --model-config")
    fit.add_argument("--name", default=None, help="profile name (default calibrated-MODEL)")
    fit.add_argument("--tolerance", type=_fraction, default=0.15,
                     help="largest relative error allowed on a held-out length (default 15%%)")
    fit.add_argument("--no-verify", action="store_true",
                     help="check the fitted formula only, without starting an emulator running it")
    fit.add_argument("-o", "--out", type=Path, default=Path("kvcache-profile.json"),
                     help="profile file to write (default kvcache-profile.json)")
    fit.add_argument("--work-dir", type=Path, default=None,
                     help="server logs and tier files (default kvcache-results/calibrate-TIMESTAMP)")


def calibrate(args: argparse.Namespace) -> int:
    import datetime as _dt
    import shlex

    from . import calibrate as C
    from .kvsize import kv_bytes_per_token
    from .servers import ServerSettings

    kind = args.kv_server or ("external" if args.kv_endpoint else "vllm")
    if kind == "external" and not args.kv_endpoint:
        raise C.CalibrationError("--kv-server external needs --kv-endpoint URL")
    if kind == "vllm" and not args.model:
        raise C.CalibrationError("--kv-server vllm needs --model (the model folder or name to serve)")
    try:
        extra_args = tuple(shlex.split(args.kv_server_args))
    except ValueError as exc:
        raise C.CalibrationError(f"--kv-server-args {args.kv_server_args!r}: {exc}") from None
    model_dir = Path(args.model) if args.model and Path(args.model).is_dir() else None
    tokenizer = args.tokenizer or (str(model_dir) if model_dir and (model_dir / "tokenizer.json").is_file() else None)
    kv_bytes = args.kv_bytes_per_token
    config = args.model_config or (str(model_dir) if model_dir and (model_dir / "config.json").is_file() else None)
    if kv_bytes is None and config:
        try:
            kv_bytes = kv_bytes_per_token(config)
        except ValueError as exc:
            raise C.CalibrationError(f"--model-config {config}: {exc}") from None
    plan = C.CalibrationPlan(input_lens=args.input_lens, holdout_lens=args.holdout, prompts=args.prompts,
                             passes=args.passes, output_len=args.output_len, backend=args.backend,
                             chunk_size=args.chunk_size,
                             decode_concurrency=args.decode_concurrency, tolerance=args.tolerance, seed=args.seed)
    server = ServerSettings(kind=kind, endpoint=args.kv_endpoint, model=args.model, python=args.kv_python,
                            extra_args=extra_args, ready_timeout=args.kv_ready_timeout)
    work_dir = args.work_dir or Path("kvcache-results") / f"calibrate-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    result = C.calibrate(plan, server, out=args.out, work_dir=work_dir, tokenizer=tokenizer,
                         kv_bytes_per_token=kv_bytes, name=args.name, verify=not args.no_verify,
                         progress=lambda line: print(f"calibrate: {line}", flush=True))
    for line in C.report_lines(result):
        print(line)
    if result.record.passes():
        print(f"wrote {result.path}: use it with --emulator-profile {result.path}")
        return 0
    print(f"pytest-kvcache calibrate: the profile misses a held-out length by more than "
          f"{100 * plan.tolerance:.0f}%; not written to {args.out}, kept as {result.path} to inspect "
          "(more prompts, a quieter machine, or lengths that bracket the held-out ones)", file=sys.stderr)
    return 1


def _frontier_table(frontier: list[dict], x: str, y: str) -> list[str]:
    header = ("folder", "item", "trial", "modality", "bandwidth", "direction", "arcc", x, y)
    rows = [(r["folder"], r["item"], r["iteration"] or "all", r["modality"], r["bandwidth"] or "-",
             r["direction"] or "-", r["arcc"] or "-", f"{float(r[x]):.4g}", f"{float(r[y]):.4g}") for r in frontier]
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def compare(args: argparse.Namespace) -> int:
    from .report import rows as R

    runs = R.find_runs(args.dirs)
    rows = [row for run in runs for row in R.item_rows(run, per_trial=args.per_trial)]
    for column in (args.x, args.y):
        if column not in R.CSV_COLUMNS:
            raise R.ResultsError(f"--x/--y {column!r} is not a CSV column; use one of: "
                                 + ", ".join(c for c in R.CSV_COLUMNS if c.endswith(("_ms", "throughput"))))
    filters = {col: [v for group in getattr(args, name) for v in group] for name, col, _m, _t in _FILTERS}
    kept = R.filter_rows(rows, filters)
    print(f"pytest-kvcache compare: {len(runs)} run folder(s), {len(rows)} rows, {len(kept)} after filters")
    if not kept:
        active = " ".join(f"--{name.replace('_', '-')} {','.join(v for g in getattr(args, name) for v in g)}"
                          for name, _c, _m, _t in _FILTERS if getattr(args, name))
        print(f"pytest-kvcache compare: error: no rows match the filters ({active or 'none'}) in "
              + ", ".join(str(r.path) for r in runs), file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    usable = [r for r in kept if r.get("usable")]
    frontier = R.pareto_frontier(usable, x=args.x, y=args.y)
    written = [R.write_csv(kept, out / "compare.csv"), R.write_csv(frontier, out / "pareto_frontier.csv")]
    if not args.no_plots:
        from .report import plots

        written.append(plots.plot_metric_vs_input_len(usable, "mean_ttft_ms", out / "ttft_vs_input_len.png"))
        written.append(plots.plot_metric_vs_input_len(usable, "total_token_throughput",
                                                      out / "throughput_vs_input_len.png"))
        written.append(plots.plot_pareto(usable, frontier, out / "pareto.png", x=args.x, y=args.y, xmax=args.xmax))
        network = plots.plot_network(usable, out / "network.png")
        if network is not None:
            written.append(network)
    print(f"Pareto frontier ({args.x} lower is better, {args.y} higher is better; {len(frontier)} of "
          f"{len(usable)} rows):")
    for line in _frontier_table(frontier, args.x, args.y):
        print("  " + line)
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from .errors import KVCacheError
    from .report.rows import ResultsError

    try:
        if args.command == "compare":
            return compare(args)
        if args.command == "calibrate":
            return calibrate(args)
    except (ResultsError, KVCacheError) as exc:
        print(f"pytest-kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
