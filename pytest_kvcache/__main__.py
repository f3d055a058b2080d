"""pytest-kvcache's command line: ``compare`` run folders, ``calibrate`` an emulator profile.

``python -m pytest_kvcache compare DIR...``: one CSV, plots, the Pareto frontier and each item's
change between runs, over many runs.

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

``python -m pytest_kvcache history [URL]``: the change points of every series (item x
metric x testbed) of the run history; ``history import RUN_DIR...`` adds run folders'
``history.json`` to it (see docs/history.md)::

    python -m pytest_kvcache history --since 30d --item 'seed_prefill/*' --plot history-plots
    python -m pytest_kvcache history postgresql://ci@db.example/kvcache --json
    python -m pytest_kvcache history import artifacts/run-* --to postgresql://ci@db.example/kvcache

``python -m pytest_kvcache doctor``: what this machine can run, backend by backend, and why
not (see :mod:`pytest_kvcache.doctor`)::

    python -m pytest_kvcache doctor --kv-python .real-stack/venv/bin/python --kv-gds-path /mnt/gds --json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
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
                                                 "emulator, find change points in the run history, check "
                                                 "what this machine can run")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help, description, add_arguments in _COMMANDS:
        add_arguments(sub.add_parser(name, help=help, description=description))
    return parser


def _compare_arguments(cmp_: argparse.ArgumentParser) -> None:
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
                      help="Pareto x axis, lower is better, and the first metric of the per-item changes "
                           "(default mean_ttft_ms)")
    cmp_.add_argument("--y", default="total_token_throughput", metavar="COLUMN",
                      help="Pareto y axis, higher is better, and the second metric of the per-item changes "
                           "(default total_token_throughput)")
    cmp_.add_argument("--xmax", type=float, default=None, metavar="X", help="right end of the Pareto plot's x axis")
    cmp_.add_argument("--no-plots", action="store_true", help="write the CSV files only")


def _doctor_arguments(doc: argparse.ArgumentParser) -> None:
    from .doctor import add_arguments

    add_arguments(doc)


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


def _calibrate_arguments(cal: argparse.ArgumentParser) -> None:
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
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the prompts' random token ids; the same seed measures the same prompts "
                           "(default 0)")
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


def _text_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    return lines + ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _frontier_table(frontier: list[dict], x: str, y: str) -> list[str]:
    from .report.plots import run_name

    header = ("folder", "phase", "item", "trial", "modality", "bandwidth", "direction", "arcc", x, y)
    return _text_table(header, [(run_name(r), r["phase"] or "-", r["item"], r["iteration"] or "all", r["modality"],
                                 r["bandwidth"] or "-", r["direction"] or "-", r["arcc"] or "-", f"{float(r[x]):.4g}",
                                 f"{float(r[y]):.4g}") for r in frontier])


def item_changes(rows: list[dict], metrics: tuple[str, ...]) -> tuple[str, list[dict]]:
    """Each item's change against the first run that has it, per later run: the reference
    run's name and one row per (item, run) with ``METRIC``, ``METRIC_reference`` and
    ``METRIC_change_pct`` (percent; None where a run lacks the figure)."""
    from .report.plots import run_name

    runs = list(dict.fromkeys(run_name(r) for r in rows))
    by_item: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_item.setdefault((r["scenario"], r["item"]), {})[run_name(r)] = r
    reference = runs[0] if runs else ""
    changes = []
    for (scenario, item), per_run in by_item.items():
        base_run = next(run for run in runs if run in per_run)  # every item has a run: runs lists them all
        for run in runs:
            if run == base_run or run not in per_run:
                continue
            row: dict[str, object] = {"scenario": scenario, "item": item, "reference": base_run, "run": run}
            for metric in metrics:
                before, after = per_run[base_run].get(metric), per_run[run].get(metric)
                row[f"{metric}_reference"], row[metric] = before, after
                row[f"{metric}_change_pct"] = (None if before in (None, 0) or after is None
                                               else (after / before - 1.0) * 100.0)
            changes.append(row)
    return reference, changes


def _changes_table(changes: list[dict], metrics: tuple[str, ...]) -> list[str]:
    def cell(value, digits: str = ".4g") -> str:
        return "-" if value is None else format(value, digits)

    header = ("item", "run", *(f"{m} {part}" for m in metrics for part in ("before", "after", "change")))
    return _text_table(header, [(c["item"], c["run"], *(v for m in metrics for v in (
        cell(c[f"{m}_reference"]), cell(c[m]), "-" if c[f"{m}_change_pct"] is None else f"{c[f'{m}_change_pct']:+.1f}%"
    ))) for c in changes])


def _changes_by_run(changes: list[dict], metrics: tuple[str, ...]) -> list[str]:
    """A line per run: the median change of each metric over its items, and its range."""
    import statistics

    rows = []
    for run in dict.fromkeys(c["run"] for c in changes):
        cells = [run, str(sum(1 for c in changes if c["run"] == run))]
        for m in metrics:
            values = sorted(c[f"{m}_change_pct"] for c in changes if c["run"] == run
                            and c[f"{m}_change_pct"] is not None)
            cells.append(f"{statistics.median(values):+.1f}% ({values[0]:+.1f}% to {values[-1]:+.1f}%)" if values
                         else "-")
        rows.append(tuple(cells))
    return _text_table(("run", "items", *(f"{m}: median change (range)" for m in metrics)), rows)


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
    from .report.storage import storage_comparison

    storage = storage_comparison(runs)  # the storage phase's items: their own table, not rows
    if storage:
        print("\n".join(storage))
    if storage and not kept:
        return 0
    if not kept:
        active = " ".join(f"--{name.replace('_', '-')} {','.join(v for g in getattr(args, name) for v in g)}"
                          for name, _c, _m, _t in _FILTERS if getattr(args, name))
        print(f"pytest-kvcache compare: error: no rows match the filters ({active or 'none'}) in "
              + ", ".join(str(r.path) for r in runs), file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    usable = [r for r in kept if r.get("usable")]
    frontier = R.pareto_frontiers(usable, x=args.x, y=args.y)
    written = [R.write_csv(kept, out / "compare.csv"), R.write_csv(frontier, out / "pareto_frontier.csv")]
    # changes between runs: one row per item and run, the usable trials pooled (whatever --per-trial says)
    pooled = R.filter_rows([row for run in runs for row in R.item_rows(run, per_trial=False)], filters)
    metrics = tuple(dict.fromkeys((args.x, args.y)))
    reference, changes = item_changes([r for r in pooled if r.get("usable")], metrics)
    if changes:
        columns = ("scenario", "item", "reference", "run",
                   *(f"{m}{part}" for m in metrics for part in ("_reference", "", "_change_pct")))
        written.append(R.write_csv(changes, out / "changes.csv", columns=columns))
    if not args.no_plots:
        from .report import plots

        written.append(plots.plot_metric_vs_input_len(usable, "mean_ttft_ms", out / "ttft_vs_input_len.png"))
        written.append(plots.plot_metric_vs_input_len(usable, "total_token_throughput",
                                                      out / "throughput_vs_input_len.png"))
        written.append(plots.plot_pareto(usable, out / "pareto.png", x=args.x, y=args.y, xmax=args.xmax))
        network = plots.plot_network(usable, out / "network.png")
        if network is not None:
            written.append(network)
        if changes:
            written.append(plots.plot_changes(changes, metrics, out / "changes.png", reference))
    print(f"Pareto frontier ({args.x} lower is better, {args.y} higher is better; one per phase; {len(frontier)} "
          f"of {len(usable)} rows):")
    for line in _frontier_table(frontier, args.x, args.y):
        print("  " + line)
    if changes:
        print(f"Per-item change against {reference} (the first run given; {args.x} lower is better, {args.y} "
              "higher is better):")
        later = list(dict.fromkeys(c["run"] for c in changes))
        # item by item for a run or two; for more, a line per run (every item is in changes.csv)
        for line in _changes_table(changes, metrics) if len(later) <= 2 else _changes_by_run(changes, metrics):
            print("  " + line)
    elif len({r["folder"] for r in pooled}) > 1:
        print("Per-item change: no item is in two of the runs")
    print("wrote: " + ", ".join(str(p) for p in written))
    return 0


_HISTORY_URL_HELP = ("a file path or sqlite:///PATH (SQLite), postgresql://USER@HOST:PORT/DB (PostgreSQL); default "
                     "./.kvcache/history.sqlite, where pytest sessions run from here record")


def _since(text: str) -> datetime.datetime:
    age = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*", text)
    if age:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[age[2]]
        return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(**{unit: float(age[1])})
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: an ISO date or time (2024-05-01, 2024-05-01T12:00, "
                                          "2024-05-01T12:00Z) or an age (30m, 24h, 7d, 2w)") from None
    return moment if moment.tzinfo else moment.astimezone()  # a time without offset is local time


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a p-value in (0, 1], e.g. 0.001")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: a change in percent >= 0, e.g. 5 or 5%")
    return value


def _history_arguments(his: argparse.ArgumentParser) -> None:
    his.add_argument("url", nargs="?", default=None, metavar="URL", help=_HISTORY_URL_HELP)
    his.add_argument("--item", default=None, metavar="GLOB",
                     help="items whose name matches: * any text, ? one character, all else literal")
    his.add_argument("--metric", action="append", default=[], metavar="NAME",
                     help="this metric only, e.g. median_ttft_ms (may be repeated)")
    his.add_argument("--since", type=_since, default=None, metavar="WHEN",
                     help="sessions from then on: an ISO date or time (local time without offset) or an age, "
                          "e.g. 7d, 24h")
    his.add_argument("--json", action="store_true", help="print the change points as a JSON list")
    his.add_argument("--plot", type=Path, default=None, metavar="DIR",
                     help="write one PNG per series, change points marked, into DIR")
    his.add_argument("--max-p", type=_probability, default=0.001, metavar="P",
                     help="report a change whose p-value is at most P (default 0.001)")
    his.add_argument("--min-change", type=_percent, default=None, metavar="PCT",
                     help="report a change of at least PCT percent (default 1; 0: every significant one)")


def _history_import_parser() -> argparse.ArgumentParser:
    imp = argparse.ArgumentParser(
        prog="python -m pytest_kvcache history import",
        description="Add the item runs of run folders' history.json (every session writes one, even when its "
                    "store was unreachable) to a history store. Runs already there are skipped.")
    imp.add_argument("dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run folder (what --kv-results-dir "
                                                                           "wrote)")
    imp.add_argument("--to", default=None, metavar="URL", help=_HISTORY_URL_HELP)
    return imp


def _open_store(url: str | None, *, create: bool):
    from .errors import HistoryError
    from .history import open_history

    store = open_history(url, rootdir=Path.cwd(), create=create)
    if store is None:
        raise HistoryError(f"history URL {url!r} turns the history off: give a store's path or URL")
    return store


def _short_time(text: str) -> str:
    from .history import parse_time

    return parse_time(text).astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _software_change(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    changed = [f"{name} {before.get(name, '-')} -> {after.get(name, '-')}"
               for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
    return ", ".join(changed) or "unchanged"


def _commit_change(before: str | None, after: str | None) -> str:
    if before == after:
        return "unchanged" if before else "-"
    return f"{(before or '-')[:12]} -> {(after or '-')[:12]}"


def _history_table(changes: list) -> list[str]:
    header = ("metric", "testbed", "first run after", "time (UTC)", "before", "after", "change", "p", "software",
              "commit")
    lines = []
    for item in dict.fromkeys(c.item for c in changes):
        rows = [(c.metric, c.testbed_id, c.run, _short_time(c.time), f"{c.before:.4g}", f"{c.after:.4g}",
                 f"{c.change_pct:+.1f}% ({'worse' if c.worse else 'better'}, {c.direction} is better)",
                 f"{c.p:.2g}", _software_change(c.software_before, c.software_after),
                 _commit_change(c.commit_before, c.commit_after)) for c in changes if c.item == item]
        widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
        lines += ["", item, "  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
                  "  " + "  ".join("-" * w for w in widths)]
        lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines


def history(args: argparse.Namespace) -> int:
    from .changepoints import detect
    from .errors import HistoryError
    from .history import MIN_CHANGE_PCT, HistoryChange

    with _open_store(args.url, create=False) as store:
        location = store.location
        all_series = store.series(item_glob=args.item, since=args.since, metrics=set(args.metric) or None)
    min_change = MIN_CHANGE_PCT if args.min_change is None else args.min_change
    found = [(s, detect(s.values, max_p=args.max_p, min_change_pct=min_change)) for s in all_series]
    changes = [HistoryChange.of(s, point) for s, points in found for point in points]
    notes = sys.stderr if args.json else sys.stdout  # --json: nothing but the JSON on stdout
    if args.plot is not None and all_series:
        from .report.history_plots import plot_history

        try:
            plot_history(found, args.plot)
        except OSError as exc:
            raise HistoryError(f"--plot {args.plot}: cannot write the plots ({exc.strerror or exc}): give a "
                               "writable folder") from exc
        print(f"pytest-kvcache history: wrote {len(found)} plot(s) to {args.plot}", file=notes)
    if args.json:
        print(json.dumps([c.to_dict() for c in changes], indent=1))
        return 0
    items = len({s.item for s in all_series})
    print(f"pytest-kvcache history: {location}: {len(all_series)} series of {items} item(s)")
    if not all_series:
        print("no series: no session recorded a usable value that passes the filters")
    elif not changes:
        print(f"no change points in {len(all_series)} series")
    else:
        worse = sum(c.worse for c in changes)
        print(f"{len(changes)} change point(s) in {len({(c.item, c.metric, c.testbed_id) for c in changes})} of "
              f"{len(all_series)} series, {worse} for the worse (p <= {args.max_p:g})")
        for line in _history_table(changes):
            print(line)
    return 0


def history_import(args: argparse.Namespace) -> int:
    from .history import load_run_folder

    loaded = [(run_dir, load_run_folder(run_dir)) for run_dir in args.dirs]  # every file checked before writing
    with _open_store(args.to, create=True) as store:
        new = sum(store.record(runs) for _, runs in loaded)  # a transaction per run folder
        location = store.location
    total = sum(len(runs) for _, runs in loaded)
    print(f"pytest-kvcache history import: {new} new item run(s) of {total} from {len(loaded)} run folder(s) "
          f"into {location}")
    return 0


#: the sub-commands in --help order: name, one-line help, description, what adds the arguments
_COMMANDS: tuple[tuple[str, str, str, Callable[[argparse.ArgumentParser], None]], ...] = (
    ("compare", "combine run folders: one CSV, plots, the TTFT/throughput Pareto frontier",
     "Read many run folders (what --kv-results-dir wrote, or folders of them), keep the rows "
     "that pass the filters, and write the combined CSV (the seed's columns first), the "
     "plots, the Pareto frontier of each phase and, with two runs or more, each item's change "
     "against the first run (changes.csv, changes.png); the frontier and the changes are also "
     "printed. A run made with --emulator-slowdown is marked so in the CSV "
     "(emulator_slowdown) and in the plots' labels. Filters take comma lists and may be "
     "repeated; matching ignores case.", _compare_arguments),
    ("calibrate", "fit an emulator profile to a real server's TTFT and check it on held-out lengths",
     "Measure a real server's median TTFT over input lengths at concurrency 1 (a cold round; "
     "with --backend, a warm round that loads from the tier), and its ITL; fit the emulator's "
     "cost model; check the fit and an emulator running it on held-out lengths. A profile "
     "within --tolerance is written to --out (use it with --emulator-profile FILE); one beyond "
     "it to OUT.rejected.json, with exit status 1.", _calibrate_arguments),
    ("history", "change points of the run history: which run changed which metric, with what software",
     "Read the run history (every item of every pytest session, see docs/history.md), build one "
     "series per item, metric and testbed (a point per session: the geometric mean of its usable "
     "trials), find the change points of each and print them with the first run after the change, "
     "the means before and after, p, and the software and commits either side. "
     "'history import RUN_DIR... [--to URL]' adds run folders' history.json to a store.", _history_arguments),
    ("doctor", "what this machine can run: GPUs, vLLM/LMCache, GDS, Redis, Mooncake, disk and RAM",
     "Probe this machine (nvidia-smi, the vLLM and LMCache of --kv-python, a GDS mount, Redis, "
     "Mooncake, free disk and RAM) and print, for every backend marker, 'runnable' or "
     "'not runnable: REASON; fix: WHAT TO DO'. Exit status 0 whatever it finds.", _doctor_arguments),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["history", "import"]:  # a command under history, beside its optional URL
        parser = _history_import_parser()
        args = parser.parse_args(argv[2:])
        args.command = "history import"
    else:
        parser = _parser()
        args = parser.parse_args(argv)
    from .errors import KVCacheError
    from .report.rows import ResultsError

    try:
        if args.command == "compare":
            return compare(args)
        if args.command == "calibrate":
            return calibrate(args)
        if args.command == "history":
            return history(args)
        if args.command == "history import":
            return history_import(args)
        if args.command == "doctor":
            from .doctor import main_doctor

            return main_doctor(args)
    except (ResultsError, KVCacheError) as exc:
        print(f"pytest-kvcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
