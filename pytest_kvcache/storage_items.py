"""A storage scenario's items in a pytest run: collected, run, recorded and gated like any item.

A scenario file with ``phase: storage`` (``scenarios/storage.yaml``) gives one
:class:`StorageItem` per matrix point. It starts no inference server: its body replays
the trace (:func:`~.storage.replay.run_storage`) in the session's scratch folder and hands
the trials to the session as every item's (:func:`storage_case_result`: one ``storage``
round per trial whose summary holds the seed's figures, an incomplete trial marked
unusable with what it lacked), so the comparison with the baseline, the confirmation
run, ``--update-baselines``, the history store, JUnit properties and pytest-benchmark
entries are those of every item (KVSession.judge). The item's JSON carries the seed's
figures and names the excluded trials.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ._atomic import write_json_atomic
from .baselines import key_to_relpath
from .collection import ScenarioItem
from .errors import ScenarioError
from .identity import Identity, host_facts, item_identity, stable_hash
from .models import CaseResult, ItemOutcome, Measurement, MetricThreshold, RoundResult, ScenarioCase, TrialResult
from .report.json_report import RESULT_SCHEMA_VERSION
from .session import KVSession
from .storage.replay import StorageConfig, run_storage
from .storage.results import SCHEMA_VERSION, StorageResult, tier_names
from .storage.results import TrialResult as StorageTrial
from .storage.scenario import parse_threshold, storage_configs
from .storage.tiers import TierUnavailable

__all__ = ["STORAGE_METRIC", "StorageItem", "StorageOutcome", "is_storage_data", "storage_case_result",
           "storage_document", "storage_items"]

#: What a storage item is judged on (higher is better): tokens / total storage I/O time.
STORAGE_METRIC = "storage_throughput_tokens_per_sec"
#: the round every storage trial is made of (no cold and warm rounds: one replay of the trace)
STORAGE_ROUND = "storage"
DEFAULT_THRESHOLD = 0.25
#: a disk tier's file in its description: where it ran this time, not the testbed
_FILE = re.compile(r"file \S+ ")


@dataclass
class StorageOutcome(ItemOutcome):
    """An item outcome whose runs are also kept as :class:`StorageResult` (the seed's
    figures, per tier): ``storage`` the first run, ``storage_confirmations`` the rest."""

    storage: StorageResult | None = None
    storage_confirmations: list[StorageResult] = field(default_factory=list)


def is_storage_data(data: Any) -> bool:
    """Whether a scenario file's data declares ``phase: storage``."""
    return isinstance(data, dict) and data.get("phase") == "storage"


def storage_case(config: StorageConfig, path: Path, threshold: float) -> ScenarioCase:
    """The scenario case a storage item shows the reports and the gate: phase and backend
    ``storage``, its hierarchy and users in the id, storage throughput as the metric (no
    rounds: the case is part of the baselines' key, and each trial names its round)."""
    scenario, _, case_id = config.name.partition("[")
    return ScenarioCase(
        scenario=scenario, path=str(path), phase="storage", case_id=case_id.rstrip("]"), backend="storage",
        input_len=0, concurrency=config.users, output_len=0, num_prompts=0, dataset=config.trace.source,
        rounds=(), measure_round="", trials=config.trials, seed=config.seed, api="",
        request_rate=math.inf, thresholds=(MetricThreshold(STORAGE_METRIC, "higher", threshold),))


def storage_items(parent: pytest.File, data: Any) -> Iterator[StorageItem]:
    """The items of a storage scenario file whose YAML ``data`` the collector read."""
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
    from .plugin import item_progress, record_item

    item = request.node
    try:
        run_storage_item(kvcache_session, item.nodeid, item.case, item.storage, item.baseline_key,
                         item_progress(request, item.case.name))
    finally:
        record_item(request, kvcache_session)


def run_storage_item(kv: KVSession, nodeid: str, case: ScenarioCase, config: StorageConfig, baseline_key: str,
                     progress: Callable[[str], None] = lambda text: None) -> StorageOutcome:
    outcome = StorageOutcome(nodeid=nodeid, case=case, baseline_key=baseline_key,
                             json_path=kv.settings.results_dir / key_to_relpath(baseline_key))
    kv.outcomes.append(outcome)
    try:
        config = _session_config(kv, config)
        outcome.case = case = dataclasses.replace(case, trials=config.trials)
        progress(f"replaying the trace: {config.trials} trials of {config.users} users")
        outcome.storage = _replay(kv, outcome, config)
        measured = Measurement(result=storage_case_result(case, outcome.storage), backend=None,
                               identity=storage_identity(kv, case, outcome.storage))
        kv.judge(outcome, measured, progress, remeasure=lambda run: _confirm(kv, outcome, config, progress, run))
    except KeyboardInterrupt:
        kv.cut_off(outcome)
        raise
    finally:
        write_json_atomic(kv.settings.results_dir / key_to_relpath(baseline_key), storage_document(outcome))
    return outcome


def _session_config(kv: KVSession, config: StorageConfig) -> StorageConfig:
    """The item's configuration with the session's --trials, its --kv-gds-path where the
    scenario names no gds_path, and its scratch folder (removed at the session's end, on
    the results' disk) where the scenario names none."""
    if kv.settings.trials:
        config = dataclasses.replace(config, trials=kv.settings.trials)
    if config.gds_path is None and kv.settings.server.gds_path:
        config = dataclasses.replace(config, gds_path=kv.settings.server.gds_path)
    if config.scratch_dir is None:
        kv.pool.workdir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(config, scratch_dir=str(kv.pool.workdir))
    return config


def _replay(kv: KVSession, outcome: StorageOutcome, config: StorageConfig) -> StorageResult:
    problem: str | None = None
    unavailable: str | None = None
    try:
        return run_storage(config)
    except TierUnavailable as exc:  # a tier this machine lacks (gds without a mount): skipped, as a backend is
        unavailable = str(exc)
    except (OSError, ValueError) as exc:  # a tier that cannot open (no redis, no room): the item fails, says why
        problem = f"the storage replay could not run: {type(exc).__name__}: {exc}"
    # outside the except blocks: one message, no chained traceback
    if unavailable is not None:
        outcome.status, outcome.message = "skipped", unavailable
        pytest.skip(unavailable)
    kv.fail(outcome, problem or "the storage replay could not run")


def _confirm(kv: KVSession, outcome: StorageOutcome, config: StorageConfig, progress: Callable[[str], None],
             run: int) -> CaseResult:
    """A confirmation run: the trace replayed again on fresh tiers."""
    progress(f"the first run looks worse: confirming with run {run} on fresh tiers")
    result = _replay(kv, outcome, config)
    outcome.storage_confirmations.append(result)
    return storage_case_result(outcome.case, result)


def storage_case_result(case: ScenarioCase, result: StorageResult) -> CaseResult:
    """A storage run as every item's trials: one ``storage`` round per trial, its summary
    the trial's figures (:func:`trial_figures`), an incomplete trial marked with what it
    lacked so that it never enters a comparison or a baseline."""
    trials = tuple(TrialResult(index=t.trial, measure_round=STORAGE_ROUND, rounds=(RoundResult(
        round=STORAGE_ROUND, records=(), duration=t.elapsed_s, summary=trial_figures(t), max_loop_lag_ms=0.0,
        invalid_reason=None if t.complete else f"incomplete, {t.shortfall}"),)) for t in result.trials)
    return CaseResult(case=case, trials=trials, server={"server": "storage", "tiers": _tiers_text(result)})


def trial_figures(trial: StorageTrial) -> dict[str, float]:
    """A trial's figures by the seed's names, and each tier's as ``tier_<figure>:<tier>``
    (``tier_read_p95_ms:cpu``, ``tier_evictions:disk``: the names of an inference round's
    tier figures, telemetry.TIER_FIGURES); figures a trial lacks are left out."""
    figures: dict[str, float | None] = {
        STORAGE_METRIC: trial.storage_throughput_tokens_per_sec,
        "wall_clock_throughput_tokens_per_sec": trial.wall_clock_throughput_tokens_per_sec,
        "bandwidth_bytes_per_sec": trial.bandwidth_bytes_per_sec, "storage_io_s": trial.storage_io_s,
        "elapsed_s": trial.elapsed_s, "tokens": trial.tokens, "read_bytes": trial.read_bytes,
        "write_bytes": trial.write_bytes, "read_write_ratio": trial.read_write_ratio,
        "tier_read_bytes": trial.tier_read_bytes, "tier_write_bytes": trial.tier_write_bytes}
    for name, tier in zip(tier_names(trial), trial.tiers):
        read = tier.read_latency
        figures.update({f"tier_{figure}:{name}": value for figure, value in (
            ("reads", tier.reads), ("writes", tier.writes), ("hits", tier.hits), ("misses", tier.misses),
            ("evictions", tier.evictions), ("demotions", tier.demotions), ("read_p50_ms", read.p50_ms),
            ("read_p95_ms", read.p95_ms), ("read_p99_ms", read.p99_ms), ("write_p95_ms", tier.write_latency.p95_ms))})
    return {k: float(v) for k, v in figures.items() if v is not None}


def _tiers_text(result: StorageResult) -> str:
    """The hierarchy's tiers as they ran (GPU or RAM, O_DIRECT or not), without the scratch file."""
    tiers = result.trials[0].tiers if result.trials else ()
    return " / ".join(f"{t.kind}: {_FILE.sub('', t.description)}" for t in tiers)


def storage_fingerprint(config: dict[str, Any], tiers: str) -> dict[str, str]:
    """The storage configuration's part of the testbed: its recorded ``config``
    (storage.replay.config_record) hashed without its name, scratch folder and trial
    count, and the ``tiers`` as they ran."""
    shape = {k: v for k, v in config.items() if k not in ("name", "scratch_dir", "trials")}
    return {"storage_config": stable_hash(shape), "storage_tiers": tiers}


def storage_identity(kv: KVSession, case: ScenarioCase, result: StorageResult) -> Identity:
    """The machine (a storage item runs here, whatever the server) and the storage
    configuration as the testbed; neither the scratch folder nor the trial count is part
    of it (trials are compared one by one, as every item's are)."""
    fingerprint = storage_fingerprint(result.config, _tiers_text(result))
    labels = {f"label.{k}": v for k, v in (getattr(kv.settings.server, "labels", ()) or ())}
    return item_identity(case, "-", {"server": "storage", **labels}, fingerprint, host=host_facts(),
                         versions=kv.settings.versions, moves=kv.settings.key_moves)


def storage_document(outcome: StorageOutcome) -> dict[str, Any]:
    """The item's JSON: the seed's figures (:meth:`StorageResult.to_dict`: config, every
    trial, the summary of the complete ones with the excluded trials named), the
    scenario, testbed and the verdict in the shape of the other items' files."""
    from .report.json_report import item_document

    # status, scenario, testbed, software, verdict as every item has them; the trials are the seed's figures
    doc = item_document(dataclasses.replace(outcome, result=None, confirmations=[]))
    doc["kind"] = "storage"
    if outcome.storage is not None:
        figures = outcome.storage.to_dict()
        doc.update(storage_schema_version=SCHEMA_VERSION, config=figures["config"], trials=figures["trials"],
                   summary=figures["summary"], excluded=list(outcome.storage.summary.excluded))
    if outcome.storage_confirmations:
        doc["confirmation_runs"] = [{"trials": run.to_dict()["trials"], "summary": run.to_dict()["summary"]}
                                    for run in outcome.storage_confirmations]
    doc["schema_version"] = RESULT_SCHEMA_VERSION
    return doc
