"""A storage scenario's items in a pytest run: collected, run, recorded and gated like any item.

A scenario file with ``phase: storage`` (``scenarios/storage.yaml``) gives one
:class:`StorageItem` per matrix point. It starts no inference server: its body replays
the trace (:func:`~.storage.replay.run_storage`) in the session's scratch folder, writes the
item's JSON (the seed's figures, the excluded trials named) where the other items'
go, and compares the storage throughput of its complete trials with the stored
baseline with the statistics and zones of every other item (stats.compare_runs,
decision.judge_item), or stores it under ``--update-baselines``. A trial that did not
complete every request never enters a comparison or a baseline; an item none of whose
trials completed fails.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ._atomic import write_json_atomic
from .baselines import BaselineRun, BaselineTrial, describe_runs, key_to_relpath
from .decision import judge_item, plan_baseline_update
from .errors import BaselineError, ScenarioError
from .identity import Identity, diff_testbeds, host_facts, item_identity, software_change, stable_hash
from .collection import ScenarioItem
from .models import ItemOutcome, MetricThreshold, ScenarioCase
from .report.json_report import RESULT_SCHEMA_VERSION
from .scenarios import read_scenario_data
from .session import KVSession
from .stats import Direction, MetricComparison, compare_runs
from .storage.replay import StorageConfig, run_storage
from .storage.results import SCHEMA_VERSION, StorageResult
from .storage.scenario import parse_threshold, storage_configs

__all__ = ["STORAGE_METRIC", "StorageItem", "StorageOutcome", "is_storage_file", "storage_document", "storage_items"]

#: What a storage item is judged on (higher is better): tokens / total storage I/O time.
STORAGE_METRIC = "storage_throughput_tokens_per_sec"
#: Stored beside it in a baseline, never judged: the wall clock includes think time.
_WALL_METRIC = "wall_clock_throughput_tokens_per_sec"
DEFAULT_THRESHOLD = 0.25
#: a disk tier's file in its description: where it ran this time, not the testbed
_FILE = re.compile(r"file \S+ ")


@dataclass
class StorageOutcome(ItemOutcome):
    """An item outcome whose measurement is a :class:`StorageResult` (``result`` stays None)."""

    storage: StorageResult | None = None


def is_storage_file(path: Path) -> bool:
    """Whether a scenario file declares ``phase: storage`` (read before scenarios.py parses it)."""
    try:
        data = read_scenario_data(path)
    except ScenarioError:
        return False  # scenarios.py reports it
    return isinstance(data, dict) and data.get("phase") == "storage"


def storage_case(config: StorageConfig, path: Path, threshold: float) -> ScenarioCase:
    """The scenario case a storage item shows the reports and the gate: phase and backend
    ``storage``, its hierarchy and users in the id, storage throughput as the metric."""
    scenario, _, case_id = config.name.partition("[")
    return ScenarioCase(
        scenario=scenario, path=str(path), phase="storage", case_id=case_id.rstrip("]"), backend="storage",
        input_len=0, concurrency=config.users, output_len=0, num_prompts=0, dataset=config.trace.source,
        rounds=(), measure_round="", trials=config.trials, seed=config.seed, api="", request_rate=math.inf,
        thresholds=(MetricThreshold(STORAGE_METRIC, "higher", threshold),))


def storage_items(parent: pytest.File) -> Iterator[StorageItem]:
    data = read_scenario_data(parent.path)  # read once already, by is_storage_file
    try:
        configs = storage_configs(data, parent.path)  # checks every key, the threshold too
    except ScenarioError as exc:
        raise parent.CollectError(str(exc)) from None
    threshold = parse_threshold(data.get("threshold", DEFAULT_THRESHOLD))
    for config in configs:
        case = storage_case(config, parent.path, threshold)
        yield StorageItem.from_parent(parent, name=case.name, callobj=_storage_test, case=case, storage=config)


class StorageItem(ScenarioItem):
    """A storage matrix point; its only fixture is the session (no server)."""

    def __init__(self, *, storage: StorageConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.storage = storage


def _storage_test(request: pytest.FixtureRequest, kvcache_session: KVSession) -> None:
    item = request.node
    run_storage_item(kvcache_session, item.nodeid, item.case, item.storage, item.baseline_key)


def run_storage_item(kv: KVSession, nodeid: str, case: ScenarioCase, config: StorageConfig,
                     baseline_key: str) -> StorageOutcome:
    outcome = StorageOutcome(nodeid=nodeid, case=case, baseline_key=baseline_key,
                             json_path=kv.settings.results_dir / key_to_relpath(baseline_key))
    kv.outcomes.append(outcome)
    try:
        _measure(kv, outcome, config)
        _judge(kv, outcome)
    except KeyboardInterrupt:
        kv.cut_off(outcome)
        raise
    finally:
        write_json_atomic(kv.settings.results_dir / key_to_relpath(baseline_key), storage_document(outcome))
    return outcome


def _measure(kv: KVSession, outcome: StorageOutcome, config: StorageConfig) -> None:
    if kv.settings.trials:
        config = dataclasses.replace(config, trials=kv.settings.trials)
    if config.scratch_dir is None:  # the session's scratch: removed at its end, on the results' disk
        kv.pool.workdir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(config, scratch_dir=str(kv.pool.workdir))
    problem: str | None = None
    try:
        result = run_storage(config)
    except (OSError, ValueError) as exc:  # a tier that cannot open (no redis, no room): the item fails, says why
        problem = f"the storage replay could not run: {type(exc).__name__}: {exc}"
    if problem is not None:  # failed outside the except block: one message, no chained traceback
        _fail(outcome, problem)
    outcome.storage = result
    outcome.case = dataclasses.replace(outcome.case, trials=config.trials)
    outcome.identity = storage_identity(kv, outcome.case, result)


def storage_identity(kv: KVSession, case: ScenarioCase, result: StorageResult) -> Identity:
    """The machine (a storage item runs here, whatever the server) and the storage
    configuration as the testbed; neither the scratch folder nor the trial count is part
    of it (trials are compared one by one, as every item's are)."""
    shape = {k: v for k, v in result.config.items() if k not in ("name", "scratch_dir", "trials")}
    tiers = result.trials[0].tiers if result.trials else ()
    fingerprint = {"storage_config": stable_hash(shape),
                   "storage_tiers": " / ".join(f"{t.kind}: {_FILE.sub('', t.description)}" for t in tiers)}
    labels = {f"label.{k}": v for k, v in (getattr(kv.settings.server, "labels", ()) or ())}
    return item_identity(case, "-", {"server": "storage", **labels}, fingerprint, host=host_facts(),
                         versions=kv.settings.versions, moves=kv.settings.key_moves)


def _current(result: StorageResult) -> list[float]:
    return [t.storage_throughput_tokens_per_sec for t in result.trials
            if t.complete and t.storage_throughput_tokens_per_sec]


def _judge(kv: KVSession, outcome: StorageOutcome) -> None:
    s, result = kv.settings, outcome.storage
    assert result is not None and outcome.identity is not None
    used, total = result.summary.trials_used, len(result.trials)
    if used == 0 or (used < total and used < max(2, (total + 1) // 2)):
        _fail(outcome, f"only {used} of {total} trials completed, too few to compare:\n  "
              + "\n  ".join(result.summary.excluded))
    unreadable: str | None = None
    try:
        baseline = kv.store.load(outcome.baseline_key)
    except BaselineError as exc:
        baseline, unreadable = None, str(exc)
    if unreadable is not None:  # failed outside the except block: one message, no chained traceback
        _fail(outcome, unreadable)
    differences = diff_testbeds(baseline.testbed, outcome.identity.testbed) if baseline else []
    if s.update_baselines or s.reset_baselines:
        _update_baseline(kv, outcome, baseline, differences)
        return
    if baseline is None or not baseline.runs:
        _skip_or_fail(kv, outcome, f"no baseline for {outcome.baseline_key} in {s.baseline_dir}; "
                      "run with --update-baselines to create one")
        return
    if differences:
        outcome.testbed_differs = True
        _skip_or_fail(kv, outcome, f"baseline {baseline.path} was recorded on another testbed ("
                      + "; ".join(differences) + "); compare like with like, or start a new baseline here "
                      "with --reset-baselines")
        return
    outcome.software_change = software_change([r.software for r in baseline.runs], outcome.identity.software)
    comparisons = _compare(kv, outcome, baseline)
    judgement = judge_item(comparisons, alpha=s.alpha, planned=kv.planned(), software_change=outcome.software_change)
    outcome.comparisons, outcome.verdicts, outcome.status = comparisons, list(judgement.verdicts), "compared"
    if judgement.failed:
        _fail(outcome, "storage throughput regression:\n  " + "\n  ".join(judgement.failures))
    if s.strict_baselines and not all(c.judged for c in comparisons):
        why = next((c.note for c in comparisons if not c.judged), "no stored storage throughput")
        _fail(outcome, f"{outcome.case.name} could not be judged: {why} (--strict-baselines)")


def _compare(kv: KVSession, outcome: StorageOutcome, baseline) -> list[MetricComparison]:
    if baseline is None or outcome.storage is None:
        return []
    threshold = outcome.case.thresholds[0]
    stored, current = baseline.metric_runs(threshold.metric), _current(outcome.storage)
    if not stored or not current:
        return []
    # the run-to-run noise pooled over the session's items' baselines on this runner, as every item's
    prior = kv._prior(threshold.metric, outcome.identity.testbed) if outcome.identity is not None else None
    return [compare_runs(threshold.metric, stored, [current], direction=Direction(threshold.direction),
                         threshold=threshold.threshold, alpha=kv.settings.alpha / max(1, kv.planned()), prior=prior)]


def _update_baseline(kv: KVSession, outcome: StorageOutcome, baseline, differences: list[str]) -> None:
    s, result = kv.settings, outcome.storage
    assert result is not None and outcome.identity is not None
    if result.summary.excluded:
        _fail(outcome, "baseline NOT updated: every trial must be complete;\n  "
              + "\n  ".join(result.summary.excluded))
    if differences and not s.reset_baselines:
        _fail(outcome, f"baseline NOT updated: {baseline.path} was recorded on another testbed ("
              + "; ".join(differences) + "); start a new one here with --reset-baselines")
    stored = list(baseline.runs) if baseline and not differences else []
    comparisons = _compare(kv, outcome, baseline) if stored else []
    plan = plan_baseline_update(comparisons, stored_runs=len(stored), reset=s.reset_baselines, alpha=s.alpha,
                                planned=kv.planned(), stored_summary=describe_runs(stored))
    outcome.comparisons = comparisons
    if plan.action == "refuse":
        _fail(outcome, plan.message)
    run = BaselineRun(run_id=kv.session_id, created=kv.started.isoformat(timespec="seconds"),
                      software=dict(outcome.identity.software), commit=kv.commit,
                      trials=tuple(BaselineTrial(index=t.trial, summary={
                          STORAGE_METRIC: t.storage_throughput_tokens_per_sec,
                          _WALL_METRIC: t.wall_clock_throughput_tokens_per_sec}) for t in result.trials))
    try:
        written, _dropped = kv.store.write(outcome.baseline_key, outcome.identity.testbed, run,
                                           replace=plan.action == "replace")
    except (BaselineError, ValueError) as exc:
        problem: str | None = f"baseline NOT updated: {exc}"
    else:
        problem = None
    if problem is not None:
        _fail(outcome, problem)
    outcome.status, outcome.baseline_updated = "baseline-updated", True
    outcome.message = f"{plan.message} ({written.path}, {len(written.runs)} runs)"


def _fail(outcome: StorageOutcome, message: str) -> None:
    outcome.status, outcome.message = "failed", message
    pytest.fail(message, pytrace=False)


def _skip_or_fail(kv: KVSession, outcome: StorageOutcome, message: str) -> None:
    if kv.settings.strict_baselines:
        _fail(outcome, message + " (--strict-baselines)")
    outcome.status, outcome.message = "skipped", message
    pytest.skip(message)


def storage_document(outcome: StorageOutcome) -> dict[str, Any]:
    """The item's JSON: the seed's figures (:meth:`StorageResult.to_dict`: config, every
    trial, the summary of the complete ones with the excluded trials named), the
    scenario, testbed and the verdict in the shape of the other items' files."""
    from .report.json_report import item_document

    doc = item_document(outcome)  # status, scenario, testbed, software, verdict as every item has them
    doc["kind"] = "storage"
    if outcome.storage is not None:
        figures = outcome.storage.to_dict()
        doc.update(storage_schema_version=SCHEMA_VERSION, config=figures["config"], trials=figures["trials"],
                   summary=figures["summary"], excluded=list(outcome.storage.summary.excluded))
    doc["schema_version"] = RESULT_SCHEMA_VERSION
    return doc
