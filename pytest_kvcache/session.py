"""The session object: settings, the server pool, results and verdicts of one pytest run.

One :class:`KVSession` lives in ``config.stash[SESSION_KEY]``. Items call
:meth:`KVSession.run_item`; the plugin's hooks read the collected results at the end
to apply the session-wide correction (Holm) and to print the summary.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import __version__
from .backends import BackendConfig
from .baselines import BaselineStore
from .errors import BaselineError
from .fingerprint import case_fingerprint
from .models import CaseResult, ScenarioCase
from .report.json_report import write_item_json
from .runner import CaseRunner
from .servers import ServerHandle, ServerPool, ServerSettings

__all__ = ["ItemOutcome", "KVSession", "Settings"]


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    tokenizer: str | None
    results_dir: Path
    baseline_dir: Path
    update_baselines: bool
    reset_baselines: bool
    strict_baselines: bool
    alpha: float
    trials: int | None
    thresholds: tuple[tuple[str, float], ...] = ()  # --threshold overrides: (metric, fraction)
    verbose: int = 0
    #: a warm round of an offload backend must load at least this fraction of the whole
    #: chunks of its prompts from the tier (telemetry.check_hits); 0 turns the check off
    min_hit_ratio: float = 0.5
    #: percentiles reported for every latency (--percentiles)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    #: client processes each round is sent from (--kv-client-processes; spread.py)
    client_processes: int = 1


@dataclass
class ItemOutcome:
    """What one item measured and decided; the summary table is made from these."""

    nodeid: str
    case: ScenarioCase
    result: CaseResult | None = None
    comparisons: list = field(default_factory=list)  # stats.MetricComparison
    verdicts: list = field(default_factory=list)  # stats.Verdict, same order
    status: str = "measured"  # measured | compared | baseline-updated | skipped | failed
    message: str = ""
    json_path: Path | None = None
    reference: CaseResult | None = None  # paired design: the reference configuration's trials


class KVSession:
    def __init__(self, settings: Settings, workdir: Path, planned_comparisons: Callable[[], int]) -> None:
        self.settings = settings
        self.pool = ServerPool(settings.server, workdir=workdir, log_dir=settings.results_dir / "logs")
        self.runner: CaseRunner | None = None
        self.store = BaselineStore(settings.baseline_dir)
        self.outcomes: list[ItemOutcome] = []
        self._planned = planned_comparisons
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.gate = None  # report.terminal.Gate, set at session end

    def close(self) -> None:
        self.pool.close()

    # -- one item -----------------------------------------------------------------

    def run_item(self, nodeid: str, case: ScenarioCase, baseline_key: str,
                 progress: Callable[[str], None]) -> ItemOutcome:
        """Measure, store, compare; fail or skip the pytest item with a clear message."""

        outcome = ItemOutcome(nodeid=nodeid, case=case)
        self.outcomes.append(outcome)
        trials = self.settings.trials or case.trials
        if case.reference_backend is not None:
            self._run_paired(outcome, case, trials, baseline_key, progress)
            return outcome
        backend = self._backend(outcome, case.backend)
        server, results = self._measure(outcome, case, backend, range(trials), progress)
        result = CaseResult(case=case, trials=results, server=_server_record(server, backend))
        outcome.result = result
        fingerprint = case_fingerprint(case, server.model, server.info, backend.fingerprint())
        outcome.json_path = self.settings.results_dir / f"{baseline_key}.json"
        try:
            self._decide(outcome, result, baseline_key, fingerprint)
        finally:
            write_item_json(outcome.json_path, outcome, fingerprint)
        return outcome

    def _backend(self, outcome: ItemOutcome, name: str):
        from .backends import BackendUnavailable

        try:
            return self.pool.backend(name, outcome.case.lmcache_mode)
        except BackendUnavailable as exc:
            outcome.status, outcome.message = "skipped", str(exc)
            pytest.skip(str(exc))

    def _measure(self, outcome: ItemOutcome, case: ScenarioCase, backend, trial_indices, progress):
        from .errors import KVCacheError

        error = None
        try:
            server = self.pool.acquire(backend)
            if self.runner is None:
                self.runner = CaseRunner(self.settings.tokenizer, percentiles=self.settings.percentiles,
                                         client_processes=self.settings.client_processes)
            results = self.runner.run(case, server.base_url, server.model, list(trial_indices), progress,
                                      telemetry=server.telemetry)
        except KVCacheError as exc:
            error = str(exc)
        if error is not None:  # failed outside the except block: one message, no chained traceback
            self._fail(outcome, error)
        from .telemetry import check_hits

        problem = check_hits(backend.name, case.phase, results, min_ratio=self.settings.min_hit_ratio)
        if problem:
            self._fail(outcome, f"{problem}\n  server log: {server.log_path}")
        return server, results

    def _run_paired(self, outcome: ItemOutcome, case: ScenarioCase, trials: int, key: str,
                    progress: Callable[[str], None]) -> None:
        """Alternate reference and candidate trial by trial (A B, B A, ...), then compare pairs."""
        reference = self._backend(outcome, case.reference_backend)
        candidate = self._backend(outcome, case.backend)
        by_side: dict[str, list] = {"reference": [], "candidate": []}
        servers: dict[str, dict] = {}
        for trial in range(trials):
            order = [("reference", reference), ("candidate", candidate)]
            for side, backend in order if trial % 2 == 0 else order[::-1]:
                server, results = self._measure(outcome, case, backend, [trial],
                                                lambda text, side=side: progress(f"{side} {text}"))
                by_side[side].extend(results)
                servers[side] = _server_record(server, backend)
        outcome.reference = CaseResult(case=case, trials=tuple(by_side["reference"]), server=servers["reference"])
        outcome.result = CaseResult(case=case, trials=tuple(by_side["candidate"]), server=servers["candidate"])
        outcome.json_path = self.settings.results_dir / f"{key}.json"
        try:
            self._compare_paired(outcome)
        finally:
            write_item_json(outcome.json_path, outcome, {"design": "paired", "reference": case.reference_backend,
                                                         "candidate": case.backend})

    def _compare_paired(self, outcome: ItemOutcome) -> None:
        from .stats import Direction, compare_paired

        ref, cand = outcome.reference, outcome.result
        pairs = [(r, c) for r, c in zip(ref.trials, cand.trials) if r.usable and c.usable]
        if len(pairs) < 2:
            problems = [f"trial {t.index + 1} ({side}): {t.problem}" for side, res in (("reference", ref),
                        ("candidate", cand)) for t in res.trials if not t.usable]
            self._fail(outcome, f"only {len(pairs)} complete pairs of trials, too few to compare:\n  "
                       + "\n  ".join(problems))
        comparisons = []
        for threshold in outcome.case.thresholds:
            values = [(r.measured.summary.get(threshold.metric), c.measured.summary.get(threshold.metric))
                      for r, c in pairs]
            values = [(a, b) for a, b in values if a is not None and b is not None]
            if len(values) >= 2:
                comparisons.append(compare_paired(threshold.metric, [a for a, _ in values], [b for _, b in values],
                                                  direction=Direction(threshold.direction),
                                                  threshold=threshold.threshold, alpha=self.settings.alpha))
        self._judge(outcome, comparisons, "paired comparison: the candidate is worse than the reference",
                    better_is_news=False)

    def _decide(self, outcome: ItemOutcome, result: CaseResult, key: str, fingerprint: dict) -> None:
        s = self.settings
        usable, total = len(result.usable_trials), len(result.trials)
        problems = [f"trial {t.index + 1}: {t.problem}" for t in result.trials if not t.usable]
        if usable < total:
            # An incomplete or invalid trial never enters a comparison or a baseline.
            if usable < max(2, (total + 1) // 2):
                self._fail(outcome, f"only {usable} of {total} trials are usable, too few to compare:\n  "
                           + "\n  ".join(problems))
        if s.update_baselines or s.reset_baselines:
            if usable < total:
                self._fail(outcome, "baseline NOT updated: every trial must be complete and valid;\n  "
                           + "\n  ".join(problems))
            try:
                self.store.append(key, fingerprint, self._baseline_run(result), reset=s.reset_baselines)
            except BaselineError as exc:
                self._fail(outcome, str(exc))
            outcome.status = "baseline-updated"
            outcome.message = f"baseline {'reset' if s.reset_baselines else 'updated'}: {self.store.path_for(key)}"
            return
        try:
            baseline = self.store.load(key)
        except BaselineError as exc:
            self._fail(outcome, str(exc))
        if baseline is None:
            self._skip_or_fail(outcome, f"no baseline for {key} in {s.baseline_dir}; "
                               "run with --update-baselines to create one")
            return
        from .baselines import fingerprint_diff

        differences = fingerprint_diff(baseline.fingerprint, fingerprint)
        if differences:
            self._skip_or_fail(outcome, f"baseline {baseline.path} was measured on another set-up ("
                               + "; ".join(differences) + "); compare like with like, or rerun with "
                               "--reset-baselines after an intended change")
            return
        self._compare(outcome, result, baseline)

    def _compare(self, outcome: ItemOutcome, result: CaseResult, baseline) -> None:
        from .stats import Direction, compare

        comparisons = []
        for threshold in outcome.case.thresholds:
            base_values = [float(t["summary"][threshold.metric]) for run in baseline.history
                           for t in run.get("trials", ()) if t["summary"].get(threshold.metric) is not None]
            current = result.metric_values(threshold.metric)
            if len(base_values) < 2 or len(current) < 1:
                continue
            comparisons.append(compare(threshold.metric, base_values, current,
                                       direction=Direction(threshold.direction),
                                       threshold=threshold.threshold, alpha=self.settings.alpha))
        self._judge(outcome, comparisons, "performance regression")

    def _judge(self, outcome: ItemOutcome, comparisons: list, headline: str, better_is_news: bool = True) -> None:
        """Verdicts with Bonferroni over every comparison the session may make: a
        conservative bound known now; Holm over the p-values actually seen is applied
        at session end (report.terminal.session_gate) and decides the exit status.

        Against a stored baseline a significant improvement is a WARN (refresh the
        baseline); in a paired design it is the expected answer, so a PASS."""
        from dataclasses import replace as _replace

        from .stats import Zone, verdict

        planned = max(1, self._planned())
        failures = []
        for comparison in comparisons:
            v = verdict(comparison, min(1.0, comparison.p_worse * planned),
                        min(1.0, comparison.p_better * planned), alpha=self.settings.alpha,
                        correction=f"Bonferroni over {planned}")
            if not better_is_news and v.zone is Zone.WARN and v.better and not v.beyond_threshold:
                v = _replace(v, zone=Zone.PASS, reason=f"{comparison.metric}: the candidate is "
                             f"{abs(comparison.change_pct):.1f}% better than the reference")
            outcome.comparisons.append(comparison)
            outcome.verdicts.append(v)
            if v.zone is Zone.FAIL:
                failures.append(_failure_line(comparison, planned))
        outcome.status = "compared"
        if failures:
            self._fail(outcome, f"{headline}:\n  " + "\n  ".join(failures))

    def _baseline_run(self, result: CaseResult) -> dict:
        return {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "plugin_version": __version__,
            "commit": _git_commit(),
            "trials": [
                {"index": t.index, "summary": dict(t.measured.summary),
                 "ttfts_ms": [round(r.ttft * 1000.0, 4) for r in t.measured.records if r.success]}
                for t in result.trials
            ],
        }

    def _fail(self, outcome: ItemOutcome, message: str) -> None:
        outcome.status, outcome.message = "failed", message
        pytest.fail(message, pytrace=False)

    def _skip_or_fail(self, outcome: ItemOutcome, message: str) -> None:
        if self.settings.strict_baselines:
            self._fail(outcome, message + " (--strict-baselines)")
        outcome.status, outcome.message = "skipped", message
        pytest.skip(message)


def _server_record(server: ServerHandle, backend: BackendConfig) -> dict[str, str]:
    """The server's info and what this item's backend configuration records (its LMCache
    mode): per item, since items that differ only there share one emulator."""
    return {**server.info, **dict(backend.recorded)}


def _failure_line(c, planned: int) -> str:
    unit = " ms" if c.metric.endswith("_ms") else ""
    return (f"{c.metric}: baseline {c.baseline_value:.4g}{unit}, current {c.current_value:.4g}{unit}, "
            f"change {c.change_pct:+.1f}% (threshold {c.threshold * 100:.0f}%), p={c.p_worse:.2g} "
            f"(Bonferroni over {planned} planned comparisons)")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
