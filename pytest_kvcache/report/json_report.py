"""One JSON file per item, with ``vllm bench serve``'s field names at the top level.

The top-level figures summarize the measured round of every usable trial together;
``trials`` holds each trial's rounds with their own summaries and telemetry, and
``verdict`` the comparison with the baseline. Incomplete or invalid trials are listed
with the reason and left out of the top-level figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any
from pathlib import Path

from .._atomic import write_json_atomic
from ..baselines import key_to_relpath
from ..decision import worst_zone
from ..metrics import request_details, summarize
from ..models import ItemOutcome
from ..outputs import output_digest

__all__ = ["OUTPUTS_SCHEMA_VERSION", "RESULT_SCHEMA_VERSION", "answers_relpath", "item_document", "outputs_document",
           "write_item_json"]

RESULT_SCHEMA_VERSION = 2
OUTPUTS_SCHEMA_VERSION = 1


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "value") and hasattr(value, "name"):  # enums
        return value.value
    return value


def item_document(outcome: ItemOutcome) -> dict:
    case = outcome.case
    doc: dict = {"schema_version": RESULT_SCHEMA_VERSION, "item": outcome.nodeid, "status": outcome.status,
                 "message": outcome.message}
    result = outcome.result
    if result is not None:
        measured = [t.measured for t in result.usable_trials]
        records = [r for m in measured for r in m.records]
        doc.update(summarize(records, sum(m.duration for m in measured)) if measured else {"completed": 0})
        doc["usable_trials"] = len(measured)
        doc["trials"] = _trials(result)
        doc["server"] = dict(result.server)
    if outcome.confirmations:
        doc["confirmation_runs"] = [{"trials": _trials(run)} for run in outcome.confirmations]
    if outcome.reference is not None:
        doc["reference"] = {"backend": case.reference_backend, "trials": _trials(outcome.reference),
                            "server": dict(outcome.reference.server)}
    doc["scenario"] = {"name": case.scenario, "file": case.path, "phase": case.phase, "backend": case.backend,
                       **case.workload_params, "trials": case.trials, "lmcache_mode": case.lmcache_mode,
                       "thresholds": [asdict(t) for t in case.thresholds]}
    if outcome.identity is not None:
        doc["testbed"] = dict(outcome.identity.testbed)
        doc["software"] = dict(outcome.identity.software)
    if outcome.software_change:
        doc["software_change"] = outcome.software_change
    check = getattr(outcome, "output_check", None)
    if check is not None:
        doc["outputs"] = {**check.to_dict(), "details": answers_relpath(outcome.baseline_key) if outcome.answers
                          else None, "answers": _answer_digests(outcome.answers)}
    zone = worst_zone([v.zone for v in outcome.verdicts])
    verdicts = list(outcome.verdicts) + [None] * (len(outcome.comparisons) - len(outcome.verdicts))
    doc["verdict"] = {
        "zone": zone.value if zone else None,
        "comparisons": [{**c.to_dict(), "verdict": v.to_dict() if v else None}
                        for c, v in zip(outcome.comparisons, verdicts)],
    }
    return _clean(doc)


def _trials(result) -> list[dict]:
    return [
        {
            "index": t.index,
            "usable": t.usable,
            "problem": t.problem,
            "rounds": {
                r.round: {**r.summary, "max_loop_lag_ms": r.max_loop_lag_ms, "invalid_reason": r.invalid_reason,
                          "client_stamps": r.client_stamps, "telemetry": dict(r.telemetry),
                          "details": request_details(r.records)}
                for r in t.rounds
            },
        }
        for t in result.trials
    ]


def _answer_rounds(trials) -> list[tuple[int, str, Any]]:
    """(trial, round name, round) of every round whose answers are kept, the control's too."""
    out = []
    for t in trials:
        out += [(t.index, r.round, r) for r in t.rounds]
        if t.control is not None:
            out.append((t.index, t.control.round, t.control))
    return out


def _answer_digests(trials) -> list[dict]:
    """A digest of every answer, by trial and round, in prompt order (None: no answer)."""
    return [{"trial": index, "round": name, "sha256_16": [output_digest(r.text) if r.success else None
                                                          for r in sorted(rnd.records, key=lambda r: r.index)]}
            for index, name, rnd in _answer_rounds(trials)]


def answers_relpath(baseline_key: str) -> str:
    """Where, in the run folder, an item's answers are kept in full: under ``answers/`` and
    named ``<item>.answers.json``, so that neither a folder of item JSON files nor a search
    for an item's file name finds anything but the item's JSON."""
    path = Path("answers") / key_to_relpath(baseline_key)
    return path.with_name(path.name.removesuffix(".json") + ".answers.json").as_posix()


def outputs_document(outcome: ItemOutcome) -> dict:
    """Every answer of the item's latest run in full: what the digests in its JSON stand for."""
    return {"schema_version": OUTPUTS_SCHEMA_VERSION, "item": outcome.nodeid, "rounds": [
        {"trial": index, "round": name, "answers": [
            {"prompt": r.index, "text": r.text if r.success else None, "error": r.error}
            for r in sorted(rnd.records, key=lambda r: r.index)]}
        for index, name, rnd in _answer_rounds(outcome.answers)]}


def write_item_json(path: Path, outcome: ItemOutcome) -> None:
    """The item's JSON at ``path``; its answers, where it has some, under the run folder's
    ``answers/`` (``path`` is ``<run folder>/<baseline key>.json``)."""
    if getattr(outcome, "answers", ()):
        run_folder = path.parents[len(key_to_relpath(outcome.baseline_key).parts) - 1]
        write_json_atomic(run_folder / answers_relpath(outcome.baseline_key), outputs_document(outcome), indent=None)
    write_json_atomic(path, item_document(outcome))
