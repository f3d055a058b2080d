"""``python -m pytest_kvcache compare DIR...``: one CSV, plots and the Pareto frontier over many runs.

Replaces the seed's ``compare_offloading.py`` (CSV over every result folder, the media
and network comparisons) and ``plot_pareto.py`` (scatter with the Pareto frontier)::

    python -m pytest_kvcache compare kvcache-results/ --phase prefill -o media-compare
    python -m pytest_kvcache compare run-a run-b run-c --modality GDS --direction east-west

Each DIR is a run folder (what ``--kv-results-dir`` wrote) or a folder of run folders.
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
                                     description="pytest-kvcache tools for result folders")
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
    return parser


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
    from .report.rows import ResultsError

    try:
        if args.command == "compare":
            return compare(args)
    except ResultsError as exc:
        print(f"pytest-kvcache compare: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
