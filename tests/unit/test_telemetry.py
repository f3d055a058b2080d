"""Telemetry: metrics and log parsing per round, and the proof of hits (unit tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_kvcache.telemetry import (
    Snapshot,
    TelemetrySource,
    causes_of,
    check_hits,
    check_round,
    expected_hit_tokens,
    metric_sum,
    parse_log,
    parse_metrics,
    summarize,
    tier_figures,
)

LMCACHE_PAGES = Path(__file__).resolve().parent / "data" / "lmcache_mp_0.5.6"

pytest_plugins = ("pytester",)

VLLM_PAGE = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="local_compute"}} {compute}
vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="local_cache_hit"}} 0.0
vllm:prompt_tokens_by_source_total{{engine="0",model_name="m",source="external_kv_transfer"}} {external}
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {prompt}
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} 0.0
vllm:external_prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
vllm:external_prefix_cache_hits_total{{engine="0",model_name="m"}} {external}
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="m"}} 3.0
"""


def page(prompt=0.0, compute=0.0, external=0.0, queries=0.0) -> str:
    return VLLM_PAGE.format(prompt=prompt, compute=compute, external=external, queries=queries)


def test_parse_metrics_keeps_labels_and_sums_by_filter():
    samples = parse_metrics(page(prompt=8000, compute=2000, external=6000, queries=8000))
    assert metric_sum(samples, "vllm:prompt_tokens_total") == 8000
    assert metric_sum(samples, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer") == 6000
    assert metric_sum(samples, "vllm:prompt_tokens_by_source_total") == 8000
    assert metric_sum(samples, "vllm:nope") is None


def test_counter_names_with_and_without_total_suffix():
    samples = parse_metrics('lmcache:num_hit_tokens{model_name="m"} 512\n')
    assert metric_sum(samples, "lmcache:num_hit_tokens_total") == 512
    samples = parse_metrics('lmcache:num_hit_tokens_total{model_name="m"} 256\n')
    assert metric_sum(samples, "lmcache:num_hit_tokens") == 256


def test_parse_metrics_ignores_junk_and_comments():
    samples = parse_metrics("# HELP x\nnot a sample\nx{a=\"1\"} NaN\ny 2\nz{a=\"b\"} notanumber\n")
    assert metric_sum(samples, "y") == 2
    assert metric_sum(samples, "z") is None


@pytest.mark.parametrize("line,hit,retrieved,stored", [
    # LMCache 0.2/0.3 in-process
    ("[2025-01-01 10:00:00,000] LMCache INFO: Reqid: cmpl-1, Total tokens 1000, LMCache hit tokens: 768, "
     "need to load: 768 (vllm_v1_adapter.py:700:lmcache)", 768, 0, 0),
    ("LMCache INFO: Retrieved 768 out of total 1000 tokens", 0, 768, 0),
    # 0.3.x: "out of N required tokens (from M total tokens)", with size and bandwidth
    ("LMCache INFO: Retrieved 1,024 out of 1,024 required tokens (from 1,200 total tokens). size: 0.1172 gb, "
     "cost 12.20 ms, throughput: 9.6 GB/s; (cache_engine.py:500)", 0, 1024, 0),
    ("LMCache INFO: Stored 768 out of total 1000 tokens. size: 0.0879 gb, cost 30.1 ms, throughput: 2.9 GB/s",
     0, 0, 768),
    # multi-process server
    ("[2026-11-22 06:10:01,000] LMCache INFO: Retrieved 1792 tokens in 3.21 ms (mp_server.py:10)", 0, 1792, 0),
    ("LMCache INFO: Stored 1792 tokens in 5.0 ms", 0, 0, 1792),
    ("INFO: 127.0.0.1 - GET /metrics 200", 0, 0, 0),
])
def test_log_lines_of_every_known_version(line, hit, retrieved, stored):
    counts = parse_log(line)
    assert (counts.hit_tokens, counts.retrieved_tokens, counts.stored_tokens) == (hit, retrieved, stored)


def test_log_bytes_and_bandwidth():
    counts = parse_log("Retrieved 1024 out of 1024 required tokens. size: 0.5 gb, cost 100 ms, throughput: 5 GB/s\n"
                       "Retrieved 1024 out of 1024 required tokens. size: 500 mb, cost 0.1 s\n")
    assert counts.retrieved_bytes == pytest.approx(1e9)
    assert counts.retrieve_seconds == pytest.approx(0.2)


def test_known_causes_are_named():
    counts = parse_log("LMCache WARNING: No supported cpu connector found, falling back\n")
    assert counts.causes == {"no_cpu_connector": 1}


def _source_with_log(tmp_path, text_before="", text_after=""):
    log = tmp_path / "server.log"
    log.write_text(text_before)
    source = TelemetrySource(metrics_urls=("http://x/metrics",), log_paths=(str(log),))
    return source, log


def test_summarize_prefers_vllm_by_source(tmp_path):
    source, log = _source_with_log(tmp_path, "Retrieved 5 out of total 5 tokens\n")
    before = Snapshot(metrics={"http://x/metrics": parse_metrics(page(prompt=8000, compute=8000, queries=8000))},
                      log_offsets={str(log): log.stat().st_size})
    with open(log, "a") as f:
        f.write("Retrieved 1536 out of total 2000 tokens\nStored 0 out of total 2000 tokens\n")
    after = Snapshot(metrics={"http://x/metrics": parse_metrics(page(prompt=16000, compute=9600, external=6400,
                                                                     queries=16000))})
    t = summarize(source, before, after)
    assert t["prompt_tokens"] == 8000
    assert t["computed_tokens"] == 1600
    assert t["external_hit_tokens"] == 6400
    assert t["external_hit_source"] == 1
    assert t["hit_ratio"] == pytest.approx(0.8)
    assert t["log_hit_tokens"] == 1536  # only the lines written during the round
    assert t["vllm:external_prefix_cache_hits_total"] == 6400


def test_summarize_falls_back_to_lmcache_metrics_then_logs(tmp_path):
    source, log = _source_with_log(tmp_path)
    before = Snapshot(metrics={"u": parse_metrics("vllm:prompt_tokens_total 0\nlmcache:num_hit_tokens_total 0\n")})
    after = Snapshot(metrics={"u": parse_metrics("vllm:prompt_tokens_total 1000\nlmcache:num_hit_tokens_total 768\n")})
    t = summarize(source, before, after)
    assert (t["external_hit_tokens"], t["external_hit_source"], t["computed_tokens"]) == (768, 3, 232)
    log.write_text("LMCache hit tokens: 512\n")
    t = summarize(source, Snapshot(log_offsets={str(log): 0}), Snapshot())
    assert (t["external_hit_tokens"], t["external_hit_source"]) == (512, 5)


def test_summarize_reads_lmcache_mp_counters():
    source = TelemetrySource()
    before = Snapshot(metrics={"u": parse_metrics("lmcache_mp_retrieved_tokens_total 100\n")})
    after = Snapshot(metrics={"u": parse_metrics("lmcache_mp_retrieved_tokens_total 868\n"
                                                 "lmcache_mp_stored_tokens_total 256\n")})
    t = summarize(source, before, after)
    assert (t["external_hit_tokens"], t["external_hit_source"], t["stored_tokens"]) == (768, 4, 256)


def test_lmcache_mp_hits_split_by_tier_are_parts_not_more_hits():
    # LMCache 0.5.6's multi-process server: a total and its L1/L2 split
    names = ("lmcache_mp_lookup_hit_tokens_total", "lmcache_mp_lookup_hit_l1_tokens_total",
             "lmcache_mp_lookup_hit_l2_tokens_total")
    before = Snapshot(metrics={"u": parse_metrics("".join(f"{n} 0\n" for n in names))})
    after = Snapshot(metrics={"u": parse_metrics(f"{names[0]} 1792\n{names[1]} 256\n{names[2]} 1536\n")})
    t = summarize(TelemetrySource(), before, after)
    assert (t["external_hit_tokens"], t["external_hit_source"]) == (1792, 4)
    assert (t["lmcache_l1_hit_tokens"], t["lmcache_l2_hit_tokens"]) == (256, 1536)


def _captured(name: str) -> Snapshot:
    return Snapshot(metrics={"u": parse_metrics((LMCACHE_PAGES / f"{name}.txt").read_text())})


@pytest.mark.parametrize("l2,store_gbps,load_gbps", [("disk", 1.0173415051105446 / 4, 0.19368510917700113),
                                                      ("redis", 2.6611169163157005 / 4, 0.1423021287210416)])
def test_lmcache_mp_figures_per_tier_from_its_real_metrics(l2, store_gbps, load_gbps):
    # LMCache 0.5.6's /metrics around a cold and a warm round: 4 prompts of 7 chunks, an L1 of
    # 8 MB (16 chunks of 512 KiB) that evicts, so the warm round reads 5 chunks back from L2
    start, cold, warm = (_captured(f"{l2}-{n}") for n in ("0-start", "1-after-cold", "2-after-warm"))
    t = summarize(TelemetrySource(), start, cold)
    assert tier_figures(t) == {
        "cpu": {"reads": 28, "writes": 28, "evictions": 0, "hits": 0, "hit_tokens": 0},
        l2: {"reads": 0, "writes": 28, "evictions": 0, "hits": 0, "hit_tokens": 0,
             "write_gbps": pytest.approx(store_gbps)}}
    t = summarize(TelemetrySource(), cold, warm)
    assert tier_figures(t) == {
        "cpu": {"reads": 28, "writes": 5, "evictions": 10, "hits": 23, "hit_tokens": 5888},
        l2: {"reads": 5, "writes": 0, "evictions": 0, "hits": 5, "hit_tokens": 1280,
             "read_gbps": pytest.approx(load_gbps)}}  # no store this round: no store throughput
    assert t[f"tier_hit_tokens:{l2}"] == t["lmcache_l2_hit_tokens"] == 1280  # the keys of before stay
    assert (t["external_hit_tokens"], t["external_hit_source"], t["lmcache_l1_hit_tokens"]) == (7168, 4, 5888)
    assert t["l1_usage_bytes"] == 6029312 and t["l2_usage_bytes"] == 7340032


def test_lmcache_mp_without_an_l2_adapter_has_its_cpu_tier_only():
    def l1_only(name: str) -> Snapshot:
        text = (LMCACHE_PAGES / f"disk-{name}.txt").read_text()
        return Snapshot(metrics={"u": parse_metrics("\n".join(
            line for line in text.splitlines() if "l2_name" not in line and "lmcache_mp_l2_" not in line))})

    t = summarize(TelemetrySource(), l1_only("1-after-cold"), l1_only("2-after-warm"))
    assert set(tier_figures(t)) == {"cpu"} and t["tier_hits:cpu"] == 23


def test_lmcache_mp_several_l2_adapters_share_the_unlabelled_counters():
    before = Snapshot(metrics={"u": parse_metrics('lmcache_mp_lookup_hit_l1_tokens_total{model_name="m"} 0\n')})
    after = Snapshot(metrics={"u": parse_metrics(
        'lmcache_mp_lookup_hit_l1_tokens_total{model_name="m"} 0\n'
        'lmcache_mp_l2_usage_bytes{l2_name="fs"} 10\nlmcache_mp_l2_usage_bytes{l2_name="mooncake_store"} 10\n'
        "lmcache_mp_l2_store_completed_objects_chunks_total 12\n"
        'lmcache_mp_l2_store_throughput_GB_per_second_sum{l2_name="fs"} 3.0\n'
        'lmcache_mp_l2_store_throughput_GB_per_second_count{l2_name="fs"} 2\n')})
    t = summarize(TelemetrySource(), before, after)
    assert t["tier_writes:disk+mooncake"] == 12 and t["tier_write_gbps:disk"] == 1.5
    assert "tier_write_gbps:mooncake" not in t and set(tier_figures(t)) == {"cpu", "disk+mooncake", "disk"}


def test_tier_figures_groups_the_keys_per_tier_the_emulators_too():
    telemetry = {"tier_hit_tokens:cpu": 512.0, "tier_hit_tokens:disk": 256.0, "tier_reads:cpu": 2.0,
                 "lmcache_l1_hit_tokens": 512.0, "tier_nonsense:cpu": 1.0, "log_cause:eviction": 1.0}
    assert tier_figures(telemetry) == {"cpu": {"hit_tokens": 512, "reads": 2}, "disk": {"hit_tokens": 256}}


def test_no_source_no_hit_figure():
    t = summarize(TelemetrySource(), Snapshot(), Snapshot())
    assert "external_hit_tokens" not in t
    assert check_round("cpu", t, [1000], min_ratio=0.5).ok


@pytest.mark.parametrize("lens,expected", [([100], 0), ([256], 0), ([257], 256), ([1000], 768), ([1024], 768),
                                           ([1025, 2000], 1024 + 1792)])
def test_expected_hits_are_whole_chunks_leaving_one_token(lens, expected):
    assert expected_hit_tokens(lens) == expected


def test_warm_round_with_hits_passes_and_without_fails_naming_the_cause():
    assert check_round("cpu", {"external_hit_tokens": 768.0, "external_query_tokens": 1000.0}, [1000],
                       min_ratio=0.5).ok
    miss = check_round("cpu", {"external_hit_tokens": 0.0, "external_query_tokens": 1000.0,
                               "log_cause:no_cpu_connector": 2.0}, [1000], min_ratio=0.5,
                       causes=causes_of({"log_cause:no_cpu_connector": 2.0}))
    assert not miss.ok
    assert "loaded 0 tokens" in miss.message and "768 expected" in miss.message
    assert "never stored" in miss.message and "No supported cpu connector" not in miss.message
    assert "no CPU connector" in miss.message
    never_asked = check_round("disk", {"external_hit_tokens": 0.0, "external_query_tokens": 0.0}, [2000],
                              min_ratio=0.5)
    assert "never asked" in never_asked.message and "--kv-transfer-config" in never_asked.message
    partial = check_round("redis", {"external_hit_tokens": 256.0}, [2000, 2000], min_ratio=0.5)
    assert not partial.ok and "too small" in partial.message
    rehearsed = check_round("disk", {"external_hit_tokens": 1024.0}, [2000, 2000], min_ratio=0.5,
                            rehearsal="LMCache setting fault_inject=0.3 drops tier keys on purpose")
    assert not rehearsed.ok
    assert "loaded 1024 tokens from the offload tier, 29% of the 3584 expected" in rehearsed.message
    assert ("likely cause: LMCache setting fault_inject=0.3 drops tier keys on purpose (a partial-loss rehearsal: "
            "the shortfall is the one asked for)") in rehearsed.message and "too small" not in rehearsed.message


def test_short_prompts_expect_no_hits_and_the_check_can_be_off():
    assert check_round("cpu", {"external_hit_tokens": 0.0}, [200], min_ratio=0.5).ok
    assert check_round("cpu", {"external_hit_tokens": 0.0}, [2000], min_ratio=0.0).ok


def test_none_must_show_zero_external_hits():
    assert check_round("none", {"external_hit_tokens": 0.0}, [2000], min_ratio=0.5).ok
    bad = check_round("none", {"external_hit_tokens": 512.0}, [2000], min_ratio=0.5)
    assert not bad.ok and "backend 'none' loaded 512 tokens" in bad.message


@dataclass
class _Rec:
    prompt_len: int
    prompt_tokens_reported: int | None = None


@dataclass
class _Round:
    round: str
    records: tuple
    telemetry: dict = field(default_factory=dict)


@dataclass
class _Trial:
    index: int
    rounds: tuple


def test_check_hits_looks_at_warm_rounds_only_and_counts_the_misses():
    recs = (_Rec(1000), _Rec(1000))
    good = _Trial(0, (_Round("cold", recs, {"external_hit_tokens": 0.0}),
                      _Round("warm", recs, {"external_hit_tokens": 1536.0})))
    bad = _Trial(1, (_Round("cold", recs, {"external_hit_tokens": 0.0}),
                     _Round("warm", recs, {"external_hit_tokens": 0.0})))
    assert check_hits("cpu", "prefill", [good], min_ratio=0.5) is None
    message = check_hits("cpu", "prefill", [good, bad, bad], min_ratio=0.5)
    assert message.startswith("trial 2 warm round of backend 'cpu' loaded 0 tokens")
    assert "1 more warm rounds missed" in message
    assert check_hits("cpu", "cache_miss", [bad], min_ratio=0.5) is None


# -- on the emulator, through the plugin -------------------------------------------------------------
