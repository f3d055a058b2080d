"""The run's files show one tier table, the storage phase's tiers and the servers' side by side,
and the storage tier plot: run.json, summary.md and report.html (write_run_files)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from helpers.tiers import case, inference_outcome, lmcache_rounds, storage_result

from pytest_kvcache.report.run_files import write_run_files
from pytest_kvcache.report.tiers import TIER_HEADER
from pytest_kvcache.storage_items import StorageOutcome


def _settings(results_dir):
    server = SimpleNamespace(kind="vllm", endpoint=None, model="tiny", emulator_slowdown=1.0, labels=())
    return SimpleNamespace(server=server, alpha=0.05, client_floor=0.9, update_baselines=True, reset_baselines=False,
                           results_dir=results_dir)


def test_run_files_show_the_tier_table_and_the_storage_plot(tmp_path):
    storage = storage_result()
    lmcache = lmcache_rounds("disk")
    outcomes = [StorageOutcome(nodeid=f"scenarios/tiers.yaml::{storage.name}", case=case(storage.name, "storage",
                                                                                         phase="storage"),
                               storage=storage, status="baseline-updated"),
                inference_outcome("real[disk-2k-c1]", "disk", [lmcache])]
    paths = write_run_files(tmp_path, outcomes, None, _settings(tmp_path))

    tiers = json.loads(paths["run.json"].read_text())["tiers"]
    assert tiers["header"] == list(TIER_HEADER)
    assert [row[:4] for row in tiers["rows"]] == [
        ["tiers[cpu+disk-u2]", "storage", "cpu", "50"], ["tiers[cpu+disk-u2]", "storage", "disk", "10"],
        ["real[disk-2k-c1]", "LMCache (warm)", "cpu", "28"], ["real[disk-2k-c1]", "LMCache (warm)", "disk", "5"]]

    md = paths["summary.md"].read_text()
    assert "### Tiers: the storage phase and the servers side by side" in md
    assert "| item | view | tier | reads | writes | hits | hit tokens | misses | evictions |" in md
    assert "| tiers[cpu+disk-u2] | storage | cpu | 50 | 25 | 35 | 140 | 15 | 4 | 25/12.5 | 1 | 2 |" in md
    assert "| real[disk-2k-c1] | LMCache (warm) | disk | 5 | 0 | 5 | 1280 | - | 0 | - | - | - | 0.194 | - | 1/1 |" in md
    assert "`plots/storage_tiers.png`" in md

    page = paths["report.html"].read_text()
    assert '<table id="tiers">' in page and "<td>LMCache (warm)</td>" in page
    assert '<img src="plots/storage_tiers.png"' in page and "Storage phase: storage throughput" in page
    assert paths["plots/storage_tiers.png"].is_file()


def test_no_tier_section_without_figures_per_tier(tmp_path):
    outcomes = [inference_outcome("seed[none-1k-c1]", "none", [{"warm": {"prompt_tokens": 1000.0}}])]
    paths = write_run_files(tmp_path, outcomes, None, _settings(tmp_path))
    assert json.loads(paths["run.json"].read_text())["tiers"]["rows"] == []
    assert "Tiers" not in paths["summary.md"].read_text()
    assert 'id="tiers"' not in paths["report.html"].read_text()
