"""The session object: settings, the server pool, results and verdicts of one pytest run.

One :class:`KVSession` lives in ``config.stash[SESSION_KEY]``, set up on first use
(``_stash.kv_session``). An item goes through the same steps whether it comes from a
scenario file (:meth:`KVSession.run_item`) or is a test written with the fixtures
(fixtures.py): :meth:`~KVSession.open_item`, :meth:`~KVSession.backend`,
:meth:`~KVSession.server`, :meth:`~KVSession.measure` (or :meth:`~KVSession.measure_paired`),
:meth:`~KVSession.judge` (or :meth:`~KVSession.judge_paired`), which asks :mod:`.decision` what the numbers mean and
turns that answer into a pytest outcome, and :meth:`~KVSession.close_item`. The plugin's
hooks read the collected outcomes at the end for the session gate, the history and the
summary.
"""

from __future__ import annotations

import datetime as _dt
import math
import secrets
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .backends import BackendConfig
from .baselines import Baseline, BaselineRun, BaselineStore, BaselineTrial, describe_runs
from .decision import judge_item, needs_confirmation, plan_baseline_update
from .errors import BaselineError, KVCacheError
from .identity import Identity, diff_testbeds, item_identity, machine_part, software_change
from .models import CaseResult, HistoryReport, ItemOutcome, Measurement, ScenarioCase, Settings, TrialResult
from .outputs import OutputCheck, check_outputs, checks_outputs, control_salt, why_not_checked
from .report.json_report import write_item_json
from .report.redact import redact_url, scrub
from .runner import CaseRunner
from .servers import ServerHandle, ServerPool
from .stats import MetricComparison, NoisePrior

if TYPE_CHECKING:
    from .decision import Gate

__all__ = ["KVSession", "history_runs", "new_session_id"]


def new_session_id(started: _dt.datetime) -> str:
    """A session's run id: sortable by time, unique across runners."""
    return f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


class KVSession:
    def __init__(self, settings: Settings, workdir: Path, planned_comparisons: Callable[[], int],
                 collected_keys: Callable[[], Sequence[tuple[str, tuple[str, ...]]]] = tuple,
                 session_id: str | None = None, started: _dt.datetime | None = None) -> None:
        self.settings = settings
        self.pool = ServerPool(settings.server, workdir=workdir, log_dir=settings.results_dir / "logs")
        self.runner: CaseRunner | None = None
        self.store = BaselineStore(settings.baseline_dir)
        self.outcomes: list[ItemOutcome] = []
        self._planned = planned_comparisons
        self._planned_late = 0
        self._collected = collected_keys
        self._priors: dict[tuple[str, str], NoisePrior | None] = {}
        self.started = started or _dt.datetime.now(_dt.timezone.utc)
        self.session_id = session_id or new_session_id(self.started)
        self.commit = _git_commit()
        self.gate: Gate | None = None  # set at session end
        #: the pytest_kvcache_after_round hook (hooks.py), set by the plugin
        self.after_round: Any = None
        self.history: HistoryReport | None = None  # what the history store said at session end
        #: what ended the run early (SIGINT, SIGTERM, KeyboardInterrupt); None when it ran to the end
        self.interrupted: str | None = None

    @property
    def change_points(self) -> list:
        """The history's recent change points of this session's items (history.HistoryChange)."""
        return list(self.history.change_points) if self.history else []

    def close(self) -> None:
        self.pool.close()

    def record_history(self, rootdir: Path) -> str | None:
        """Every item's runs into the run folder's history.json, then into the history store;
        the recent change points of the session's items, and plots of their series.

        Returns a warning when something could not be written: the store's trouble
        (unreachable, corrupt) changes no verdict, and the run folder can be loaded later
        with ``python -m pytest_kvcache history import``.
        """
        from .changepoints import detect
        from .history import MIN_CHANGE_PCT, open_history, recent_change_points, write_run_file

        runs = history_runs(self)
        if not runs:
            return None
        folder = self.settings.results_dir
        try:
            write_run_file(folder, runs)
        except (OSError, KVCacheError) as exc:
            return f"the run's history.json could not be written: {exc}"
        if self.settings.history_url is None:
            return None
        items, testbeds = sorted({r.item for r in runs}), {r.testbed_id for r in runs}
        try:
            store = open_history(self.settings.history_url, rootdir=rootdir)
            assert store is not None  # None only for "none": history_url is None then
            with store:
                store.record(runs)
                changes = recent_change_points(store, items, sorted(testbeds), last=self.settings.history_window)
                series = [s for s in store.series(items=items) if s.testbed_id in testbeds]
                location = store.location
        except KVCacheError as exc:
            return (f"history not recorded ({exc}); the verdicts stand; load this run later with: "
                    f"python -m pytest_kvcache history import {folder}")
        changed = {(c.item, c.metric, c.testbed_id) for c in changes}
        plotted = [(s, detect(s.values, min_change_pct=MIN_CHANGE_PCT)) for s in series
                   if (s.item, s.metric, s.testbed_id) in changed]
        plots: list[str] = []
        if plotted:
            from .report.history_plots import plot_history

            try:
                plots = [p.relative_to(folder).as_posix() for p in plot_history(plotted, folder / "plots" / "history")]
            except OSError as exc:
                return f"the history plots could not be written: {exc}"
        self.history = HistoryReport(location=location, series=tuple(
            (s.item, s.metric, len(s.points), s.values[-1]) for s in series), change_points=tuple(changes),
            plots=tuple(plots))
        return None

    # -- one item: the steps a scenario item and a Python benchmark (fixtures.py) share ----

    def run_item(self, nodeid: str, case: ScenarioCase, baseline_key: str,
                 progress: Callable[[str], None]) -> ItemOutcome:
        """A scenario item: backend, server, load, gate; fail or skip the pytest item with a clear message."""
        outcome = self.open_item(nodeid, case, baseline_key)
        trials = range(self.settings.trials or case.trials)
        try:
            if case.reference_backend is not None:
                source = "--trials" if self.settings.trials else f"trials in {Path(case.path).name}"
                self.require_pairs(outcome, case, len(trials), source)
                reference = self.backend(outcome, case.reference_backend, case.lmcache_mode)
                candidate = self.backend(outcome, case.backend, case.lmcache_mode)
                self.judge_paired(outcome, *self.measure_paired(outcome, case, reference, candidate, trials, progress))
            else:
                backend = self.backend(outcome, case.backend, case.lmcache_mode)
                self.judge(outcome, self.measure(outcome, case, backend, trials, progress), progress)
        except KeyboardInterrupt:
            self.cut_off(outcome)
            raise
        finally:
            self.close_item(outcome)
        return outcome

    @contextmanager
    def step(self, outcome: ItemOutcome) -> Iterator[None]:
        """A step of an item run from a test's body: cut off by Ctrl-C or SIGTERM, the item
        says so in its JSON (a scenario item's body does this in :meth:`run_item`)."""
        try:
            yield
        except KeyboardInterrupt:
            self.cut_off(outcome)
            self.close_item(outcome)
            raise

    @staticmethod
    def cut_off(outcome: ItemOutcome) -> None:
        """An item stopped by Ctrl-C or SIGTERM before its verdict: INTERRUPTED, never MEASURED."""
        if outcome.status == "measured":
            outcome.status = "interrupted"
            outcome.message = "interrupted before it was judged (Ctrl-C or SIGTERM)"

    def open_item(self, nodeid: str, case: ScenarioCase, baseline_key: str) -> ItemOutcome:
        """The outcome of an item that starts now: in the summary, the JSON and the gate."""
        from .baselines import key_to_relpath

        outcome = ItemOutcome(nodeid=nodeid, case=case, baseline_key=baseline_key,
                              json_path=self.settings.results_dir / key_to_relpath(baseline_key))
        self.outcomes.append(outcome)
        return outcome

    def close_item(self, outcome: ItemOutcome) -> None:
        assert outcome.json_path is not None, "an item not opened by open_item"
        write_item_json(outcome.json_path, outcome)

    @property
    def case_runner(self) -> CaseRunner:
        """The session's load client (its tokenizer and built prompts live as long as the session)."""
        if self.runner is None:
            self.runner = CaseRunner(self.settings.tokenizer, percentiles=self.settings.percentiles,
                                     client_processes=self.settings.client_processes,
                                     request_timeout=self.settings.request_timeout,
                                     client_floor=self.settings.client_floor)
        return self.runner

    def planned(self) -> int:
        """Comparisons the session plans: those counted at collection, and any a Python
        benchmark's gate added beyond its declared ones (:meth:`plan_more`)."""
        return self._planned() + self._planned_late

    def plan_more(self, comparisons: int) -> None:
        self._planned_late += comparisons

    def backend(self, outcome: ItemOutcome, name: str, lmcache_mode: str | None = None,
                server_args: Sequence[str] = ()) -> BackendConfig:
        """Backend ``name``'s configuration, ``server_args`` added to its server's arguments
        (so they are part of its key and testbed); the item is skipped with the reason
        where the backend cannot run here."""
        from dataclasses import replace

        from .backends import BackendUnavailable

        try:
            config = self.pool.backend(name, lmcache_mode)
        except BackendUnavailable as exc:
            outcome.status, outcome.message = "skipped", str(exc)
            pytest.skip(str(exc))
        if server_args and self.settings.server.kind == "emulator":
            config = replace(config, emulator_args=(*config.emulator_args, *server_args))
        elif server_args and self.settings.server.kind == "vllm":
            config = replace(config, vllm_args=(*config.vllm_args, *server_args))
        return config

    def server(self, outcome: ItemOutcome, backend: BackendConfig) -> ServerHandle:
        """``backend``'s server: the running one while the configuration is the same, else
        a new one; a server that cannot start fails the item."""
        try:
            return self.pool.acquire(backend)
        except KVCacheError as exc:
            error = str(exc)
        self.fail(outcome, error)  # outside the except block: one message, no chained traceback

    def measure(self, outcome: ItemOutcome, case: ScenarioCase, backend: BackendConfig, trials: Iterable[int],
                progress: Callable[[str], None]) -> Measurement:
        """The trials with these indices on ``backend``'s server, checked (a server that
        died, a warm round that missed the tier fail the item); the item's latest result."""
        server, results = self._measure(outcome, case, backend, trials, progress)
        measured = Measurement(result=CaseResult(case=case, trials=results, server=_server_record(server, backend)),
                               backend=backend, identity=self._identity(case, server, backend))
        outcome.case, outcome.result, outcome.identity = case, measured.result, measured.identity
        return measured

    def _identity(self, case: ScenarioCase, server: ServerHandle, backend: BackendConfig) -> Identity:
        return item_identity(case, server.model, server.info, backend.fingerprint(), host=self.pool.host_facts(),
                             versions=self.settings.versions, moves=self.settings.key_moves)

    def _measure(self, outcome: ItemOutcome, case: ScenarioCase, backend: BackendConfig, trial_indices,
                 progress: Callable[[str], None], fresh: bool = False) -> tuple[ServerHandle, tuple[TrialResult, ...]]:
        from .telemetry import check_hits

        error, missed = None, None
        server: ServerHandle | None = None
        results: tuple[TrialResult, ...] = ()
        indices = list(trial_indices)
        salt_run = secrets.token_hex(4)  # a fresh control salt for every run, a restarted tier's too
        control = (partial(control_salt, f"{self.session_id}-{salt_run}")
                   if checks_outputs(case, backend.name, self.settings.check_outputs) else None)
        endpoint = self.settings.server.endpoint
        external = redact_url(endpoint) if self.settings.server.kind == "external" and endpoint else None
        try:
            server = self.pool.restart(backend) if fresh else self.pool.acquire(backend)
            # the first trial alone first: a warm round that shows the tier missing fails the item
            # now, not after every trial (a rehearsed loss runs them all: its cost is the measurement)
            for part in (indices[:1], indices[1:]):
                if part and (missed is None or backend.rehearsal):
                    results += self.case_runner.run(case, server.base_url, server.model, part, progress,
                                                    telemetry=server.telemetry, control_salt=control,
                                                    after_round=self._after_round(case, backend.name, server))
                    missed = check_hits(backend.name, case.phase, results, min_ratio=self.settings.min_hit_ratio,
                                        external=external, not_run=len(indices) - len(results),
                                        rehearsal=backend.rehearsal)
        except KVCacheError as exc:
            error = str(exc)
            # a request that failed because the server died says so, not only "ConnectError"
            died = server.exit_report(grace=1.0) if server is not None else None
            if died:
                error = f"the server died during the run: {died}\n  the request that failed: {error}"
        if error is not None:  # failed outside the except block: one message, no chained traceback
            self.fail(outcome, error)
        assert server is not None  # acquired, or an error above
        if outcome.result is None and case.reference_backend is None:
            # what was measured stays in the item's JSON should a check below fail the item
            outcome.result = CaseResult(case=case, trials=results, server=_server_record(server, backend))
            outcome.identity = self._identity(case, server, backend)
        if any(not t.usable for t in results):
            died = server.exit_report(grace=1.0)
            if died:
                self.fail(outcome, f"the server died during the run: {died}\n  "
                           + "\n  ".join(f"trial {t.index + 1}: {t.problem}" for t in results if not t.usable))
        if missed:  # an external server has no log of ours to point at
            self.fail(outcome, missed + (f"\n  server log: {server.log_path}" if server.log_path else ""))
        self._check_answers(outcome, case, backend.name, results, control is not None, server)
        return server, results

    def _after_round(self, case: ScenarioCase, backend: str, server: ServerHandle
                     ) -> Callable[[int, str], None] | None:
        hook = self.after_round
        if hook is None or not hook.get_hookimpls():  # implemented by no conftest or plugin: nothing to call
            return None

        def after_round(trial: int, round_name: str) -> None:
            try:
                hook(item=case.name, backend=backend, trial=trial, round_name=round_name, server=server)
            except Exception as exc:  # noqa: BLE001 - a user's hook: its failure is the item's, named
                raise KVCacheError(f"pytest_kvcache_after_round after trial {trial + 1}'s {round_name} round "
                                   f"raised {type(exc).__name__}: {exc}") from None

        return after_round

    def _check_answers(self, outcome: ItemOutcome, case: ScenarioCase, backend: str, results: Sequence[TrialResult],
                       on: bool, server: ServerHandle) -> None:
        """The warm rounds' answers against recomputation (outputs.py): wrong answers fail
        the item, so such a run is never judged, let alone stored."""
        if on:
            check = check_outputs(case, backend, results)
        else:
            reason = why_not_checked(case, backend)
            check = OutputCheck(status="not_applicable" if reason else "off", reason=reason or (
                "--no-kv-check-outputs" if self.settings.check_outputs is False else "check_outputs: false"
                if case.check_outputs is False else f"output_len {case.output_len}: answers of one token are not "
                "checked by default (check_outputs: true, or --kv-check-outputs, turns it on)"))
        if outcome.output_check is None or outcome.output_check.status in ("not_applicable", "off") or on:
            outcome.output_check, outcome.answers = check, tuple(results)
        if check.failed:
            self.fail(outcome, check.reason + (f"\n  server log: {server.log_path}" if server.log_path else ""))

    # -- paired design ------------------------------------------------------------------

    def require_pairs(self, outcome: ItemOutcome, case: ScenarioCase, trials: int, source: str) -> None:
        """Checked before anything is measured: one pair cannot show a difference."""
        if trials < 2:
            self.fail(outcome, f"a paired comparison ({case.backend} against {case.reference_backend}) needs at "
                       f"least 2 trials, one pair of reference and candidate runs each, and {source} is {trials}; "
                       "use --trials 2 or more")

    def measure_paired(self, outcome: ItemOutcome, case: ScenarioCase, reference: BackendConfig,
                       candidate: BackendConfig, trials: Iterable[int],
                       progress: Callable[[str], None]) -> tuple[Measurement, Measurement]:
        """Reference and candidate trial by trial, alternating which goes first (A B, B A, ...)."""
        by_side: dict[str, list] = {"reference": [], "candidate": []}
        servers: dict[str, ServerHandle] = {}
        for position, trial in enumerate(trials):
            order = [("reference", reference), ("candidate", candidate)]
            for side, backend in order if position % 2 == 0 else order[::-1]:
                server, results = self._measure(outcome, case, backend, [trial], partial(_said_of, side, progress))
                by_side[side].extend(results)
                servers[side] = server
        ref, cand = (Measurement(result=CaseResult(case=case, trials=tuple(by_side[side]),
                                                   server=_server_record(servers[side], backend)),
                                 backend=backend, identity=self._identity(case, servers[side], backend))
                     for side, backend in (("reference", reference), ("candidate", candidate)))
        outcome.case, outcome.reference, outcome.result, outcome.identity = case, ref.result, cand.result, cand.identity
        return ref, cand

    def judge_paired(self, outcome: ItemOutcome, reference: Measurement, candidate: Measurement) -> None:
        """Compare the candidate with the reference pair by pair (a paired t on the log
        ratios), with the case's thresholds; fail the item as the verdicts say."""
        from .stats import Direction, compare_paired

        case = candidate.result.case
        outcome.case, outcome.reference, outcome.result = case, reference.result, candidate.result
        outcome.identity = candidate.identity
        ref, cand = reference.result, candidate.result
        pairs = [(r, c) for r, c in zip(ref.trials, cand.trials) if r.usable and c.usable]
        if len(pairs) < 2:
            problems = [f"trial {t.index + 1} ({side}): {t.problem}" for side, res in (("reference", ref),
                        ("candidate", cand)) for t in res.trials if not t.usable]
            self.fail(outcome, f"only {len(pairs)} complete pairs of trials, too few to compare:\n  "
                       + "\n  ".join(problems))
        comparisons = []
        for threshold in case.thresholds:
            given = [(r.measured.summary.get(threshold.metric), c.measured.summary.get(threshold.metric))
                     for r, c in pairs]
            values = [(float(a), float(b)) for a, b in given if a is not None and b is not None]
            if len(values) >= 2:
                comparisons.append(compare_paired(threshold.metric, [a for a, _ in values], [b for _, b in values],
                                                  direction=Direction(threshold.direction),
                                                  threshold=threshold.threshold, alpha=self.settings.alpha))
        judgement = judge_item(comparisons, alpha=self.settings.alpha, planned=self.planned(), paired=True)
        self._conclude(outcome, comparisons, judgement, "paired comparison: the candidate is worse than the reference")

    # -- against the stored baseline ----------------------------------------------------------

    def judge(self, outcome: ItemOutcome, measured: Measurement, progress: Callable[[str], None],
              remeasure: Callable[[int], CaseResult] | None = None) -> None:
        """Compare ``measured`` with the item's stored baseline (confirming a first run that
        looks worse with ``remeasure(run)``: by default the trials again on a fresh server),
        or store it under --update-baselines / --reset-baselines; fail or skip the item as
        the gate says."""
        s = self.settings
        result, identity, backend = measured.result, measured.identity, measured.backend
        if remeasure is None:
            assert backend is not None, "an item without a server brings its own remeasure"
            remeasure = partial(self._remeasure, outcome, backend, result, progress)
        outcome.case, outcome.result, outcome.identity = result.case, result, identity
        usable, total = len(result.usable_trials), len(result.trials)
        problems = [f"trial {t.index + 1}: {t.problem}" for t in result.trials if not t.usable]
        # An incomplete or invalid trial never enters a comparison or a baseline.
        if usable < total and usable < max(2, (total + 1) // 2):
            self.fail(outcome, f"only {usable} of {total} trials are usable, too few to compare:\n  "
                       + "\n  ".join(problems))
        try:
            baseline, unreadable = self.store.load(outcome.baseline_key), None
        except BaselineError as exc:
            baseline, unreadable = None, str(exc)
        if unreadable is not None:  # failed outside the except block: one message, no chained traceback
            if s.update_baselines or s.reset_baselines:
                flag = "--reset-baselines" if s.reset_baselines else "--update-baselines"
                unreadable = (f"baseline NOT updated: {flag} never overwrites a baseline file it cannot read "
                              f"(it may hold runs worth keeping); {unreadable}")
            self.fail(outcome, unreadable)
        differences = diff_testbeds(self._stored_testbed(baseline), identity.testbed) if baseline else []
        if s.update_baselines or s.reset_baselines:
            self._update_baseline(outcome, baseline, differences, problems, backend)
            return
        if baseline is None or not baseline.runs:
            self._skip_or_fail(outcome, f"no baseline for {outcome.baseline_key} in {s.baseline_dir}; "
                               "run with --update-baselines to create one")
        if differences:
            outcome.testbed_differs = True
            self._skip_or_fail(outcome, f"baseline {baseline.path} was recorded on another testbed ("
                               + "; ".join(differences) + "); compare like with like, or start a new baseline "
                               "here with --reset-baselines")
        outcome.software_change = software_change([r.software for r in baseline.runs], identity.software)
        comparisons = self._compare(outcome, baseline, [result])
        for attempt in range(1, s.confirm_runs + 1):
            if not needs_confirmation(comparisons):
                break
            outcome.confirmations.append(remeasure(attempt + 1))
            comparisons = self._compare(outcome, baseline, [result, *outcome.confirmations])
        judgement = judge_item(comparisons, alpha=s.alpha, planned=self.planned(),
                               software_change=outcome.software_change)
        self._conclude(outcome, comparisons, judgement, "performance regression")
        unjudged = [c for c in comparisons if not c.judged]
        if s.strict_baselines and (unjudged or not comparisons):
            why = unjudged[0].note if unjudged else "the baseline has no value of the item's metrics"
            self.fail(outcome, f"{outcome.case.name} could not be judged: {why} (--strict-baselines)")

    def _remeasure(self, outcome: ItemOutcome, backend: BackendConfig, first: CaseResult,
                   progress: Callable[[str], None], run: int) -> CaseResult:
        """The first run's trials again on a fresh server: a confirmation run."""
        progress(f"the first run looks worse: confirming with run {run} on a fresh server")
        _server, results = self._measure(outcome, outcome.case, backend, [t.index for t in first.trials],
                                         progress, fresh=True)
        return CaseResult(case=outcome.case, trials=results, server=first.server)

    def _stored_testbed(self, baseline: Baseline) -> dict[str, str]:
        return self._stored_testbed_of(baseline.testbed)

    def _stored_testbed_of(self, testbed: Mapping[str, str]) -> dict[str, str]:
        """A stored testbed as the keys are split now: a key the user moved to the
        software since (kvcache_software_keys) no longer keeps the baseline from comparing."""
        moves = self.settings.key_moves
        return {k: v for k, v in testbed.items() if moves.side(k) == "testbed"}

    def _compare(self, outcome: ItemOutcome, baseline: Baseline, runs: Sequence[CaseResult]) -> list[MetricComparison]:
        from .stats import Direction, compare_runs

        assert outcome.identity is not None, "compared before it was measured"
        testbed = outcome.identity.testbed
        planned = max(1, self.planned())
        comparisons = []
        for threshold in outcome.case.thresholds:
            stored = baseline.metric_runs(threshold.metric)
            current = [values for values in (run.metric_values(threshold.metric) for run in runs) if values]
            if not stored or not current:
                continue
            comparisons.append(compare_runs(
                threshold.metric, stored, current, direction=Direction(threshold.direction),
                threshold=threshold.threshold, alpha=self.settings.alpha / planned,
                prior=self._prior(threshold.metric, testbed),
                # an external server's runs share it; a storage item runs no server
                shared_current=self.settings.server.kind == "external" and outcome.case.phase != "storage"))
        return comparisons

    def _conclude(self, outcome: ItemOutcome, comparisons: list[MetricComparison], judgement, headline: str) -> None:
        outcome.comparisons, outcome.verdicts = list(comparisons), list(judgement.verdicts)
        outcome.status = "compared"
        if judgement.failed:
            self.fail(outcome, f"{headline}:\n  " + "\n  ".join(judgement.failures))

    def _prior(self, metric: str, testbed) -> NoisePrior | None:
        """The run-to-run noise of ``metric`` pooled over the session's items stored on the
        same runner (docs/statistics.md), else the configured figure, else None."""
        import json

        machine = json.dumps(machine_part(testbed), sort_keys=True)
        key = (machine, metric)
        if key not in self._priors:
            self._priors[key] = self._pooled_prior(metric, machine_part(testbed))
        return self._priors[key]

    def _pooled_prior(self, metric: str, machine: dict) -> NoisePrior | None:
        import numpy as np

        from .stats import fit_noise_prior, night_variance

        tables: list[dict[str, float]] = []
        for key, metrics in self._collected():
            if metric not in metrics:
                continue
            try:
                stored = self.store.load(key)
            except BaselineError:
                continue  # its own item reports it
            if stored is None or machine_part(stored.testbed) != machine:
                continue
            means = {run.run_id: float(np.mean(np.log(run.values(metric)))) for run in stored.runs
                     if run.values(metric)}
            if len(means) >= 2:
                tables.append(means)
        fallback = NoisePrior.configured(self.settings.run_noise) if self.settings.run_noise else None
        if len(tables) < 2:
            return fallback
        variances = [float(np.var(list(t.values()), ddof=1)) for t in tables]
        dfs = [len(t) - 1 for t in tables]
        s0, d0 = fit_noise_prior(np.array(variances), np.array(dfs, dtype=float))
        return NoisePrior(var=float(s0), df=float(d0), source=f"the run-to-run noise of {len(tables)} items' baselines",
                          night_var=_night(tables, night_variance))

    def _update_baseline(self, outcome: ItemOutcome, baseline: Baseline | None, differences: list[str],
                         problems: list[str], backend: BackendConfig | None) -> None:
        s = self.settings
        if backend is not None and s.server.emulator_slowdown != 1.0:
            self.fail(outcome, f"baseline NOT updated: --emulator-slowdown {s.server.emulator_slowdown:g} rehearses "
                       "a regression; a run made with it is never stored as a baseline")
        if backend is not None and backend.rehearsal:
            self.fail(outcome, f"baseline NOT updated: {backend.rehearsal}, a rehearsal of a failing tier; a run "
                       "made with it is never stored as a baseline")
        if problems:
            self.fail(outcome, "baseline NOT updated: every trial must be complete and valid;\n  "
                       + "\n  ".join(problems))
        if baseline is not None and differences and not s.reset_baselines:
            self.fail(outcome, f"baseline NOT updated: {baseline.path} was recorded on another testbed ("
                       + "; ".join(differences) + "); start a new one here with --reset-baselines")
        assert outcome.result is not None and outcome.identity is not None, "an update before a measurement"
        stored = list(baseline.runs) if baseline and not differences else []
        comparisons = self._compare(outcome, baseline, [outcome.result]) if baseline and stored else []
        plan = plan_baseline_update(comparisons, stored_runs=len(stored), reset=s.reset_baselines, alpha=s.alpha,
                                    planned=self.planned(),
                                    stored_summary=describe_runs(list(baseline.runs)) if baseline else "")
        outcome.comparisons = comparisons
        if plan.action == "refuse":
            self.fail(outcome, plan.message)
        problem = None
        try:
            written, dropped = self.store.write(
                outcome.baseline_key, outcome.identity.testbed, self._baseline_run(outcome),
                replace=plan.action == "replace",
                differences=lambda stored, current: diff_testbeds(self._stored_testbed_of(stored), current))
        except BaselineError as exc:
            problem = str(exc)
        except ValueError as exc:  # the run holds a value a baseline cannot (BaselineStore.write)
            problem = f"baseline NOT updated: {exc}"
        if problem is not None:  # failed outside the except block: one message, no chained traceback
            self.fail(outcome, problem)
        outcome.status, outcome.baseline_updated = "baseline-updated", True
        outcome.message = f"{plan.message} ({written.path}, {len(written.runs)} runs)"
        if dropped and plan.action == "append":
            outcome.message += f"; the oldest {describe_runs(dropped)} left the baseline (it keeps {len(written.runs)})"

    def _baseline_run(self, outcome: ItemOutcome) -> BaselineRun:
        assert outcome.result is not None and outcome.identity is not None, "stored before it was measured"
        return BaselineRun(
            run_id=self.session_id, created=self.started.isoformat(timespec="seconds"),
            software=dict(outcome.identity.software), commit=self.commit,
            trials=tuple(BaselineTrial(index=t.index, summary=dict(t.measured.summary), ttfts_ms=tuple(
                round(r.ttft * 1000.0, 4) for r in t.measured.records if r.success)) for t in outcome.result.trials))

    def fail(self, outcome: ItemOutcome, message: str) -> NoReturn:
        """Fail the item with ``message`` (its status and message set, the endpoint scrubbed)."""
        message = scrub(message, self.settings.server.endpoint)  # an error may quote the endpoint's URL
        outcome.status, outcome.message = "failed", message
        pytest.fail(message, pytrace=False)

    def _skip_or_fail(self, outcome: ItemOutcome, message: str) -> NoReturn:
        if self.settings.strict_baselines:
            self.fail(outcome, message + " (--strict-baselines)")
        message = scrub(message, self.settings.server.endpoint)
        outcome.status, outcome.message = "skipped", message
        pytest.skip(message)


def _said_of(side: str, progress: Callable[[str], None], text: str) -> None:
    """A paired item's progress line, saying which side it is of."""
    progress(f"{side} {text}")


def _night(tables: list[dict[str, float]], night_variance) -> float | None:
    """The night variance from the items' run means in the sessions most of them share
    (items holding all of those sessions); None with fewer than 3 x 3."""
    import numpy as np

    counts: dict[str, int] = {}
    for table in tables:
        for run_id in table:
            counts[run_id] = counts.get(run_id, 0) + 1
    shared = [run_id for run_id, n in counts.items() if n >= len(tables) / 2]
    rows = [[t[r] for r in shared] for t in tables if all(r in t for r in shared)]
    if len(rows) < 3 or len(shared) < 3:
        return None
    return float(night_variance(np.array(rows)))


def _server_record(server: ServerHandle, backend: BackendConfig) -> dict[str, str]:
    """The server's info and what this item's backend configuration records (its LMCache
    mode): per item, since items that differ only there share one emulator. A URL's
    credentials are never recorded."""
    record = {**server.info, **dict(backend.recorded)}
    return {k: redact_url(v) if isinstance(v, str) else v for k, v in record.items()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def history_runs(session: KVSession) -> list:
    """The session's :class:`~pytest_kvcache.history.ItemRun` records, one per item and attempt."""
    from .decision import worst_zone
    from .history import ItemRun

    runs = []
    time = session.started.isoformat(timespec="seconds")
    for o in session.outcomes:
        if o.result is None or o.identity is None:
            continue
        software = dict(o.identity.software)
        commit = software.get("version.commit") or session.commit
        zone = worst_zone([v.zone for v in o.verdicts])
        metrics = tuple((t.metric, t.direction) for t in o.case.thresholds)
        for attempt, result in enumerate([o.result, *o.confirmations]):
            trials = tuple({"index": t.index, "usable": t.usable,
                            "summary": {k: v for k, v in t.measured.summary.items()
                                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v)}}
                           for t in result.trials)
            runs.append(ItemRun(session_id=session.session_id, time=time, item=o.baseline_key, attempt=attempt,
                                testbed=dict(o.identity.testbed), software=software, commit=commit,
                                baseline_updated=o.baseline_updated, status=o.status,
                                zone=zone, metrics=metrics, trials=trials))
    return runs
