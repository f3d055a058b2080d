"""Unit tests of the emulator's parts that need no server."""

from __future__ import annotations

import os
import random

import pytest

from pytest_kvcache.emulator.costmodel import PROFILES, make_profile
from pytest_kvcache.emulator.prefix_cache import PrefixCache, chunk_keys
from pytest_kvcache.emulator.tiers import CpuTier, DiskTier, NoneTier
from pytest_kvcache.emulator.tokenizer import (
    SPECIAL_TOKENS,
    WordTokenizer,
    get_tokenizer,
)


# -- tokenizer ---------------------------------------------------------------------------
def test_tokenizer_round_trip_all_ids():
    tok = get_tokenizer()
    ids = list(range(tok.vocab_size))
    text = tok.decode(ids)
    assert tok.encode(text) == ids
    assert len(set(text.split())) == tok.vocab_size  # words are unique


def test_tokenizer_round_trip_random_and_words_are_plain():
    tok = get_tokenizer()
    rng = random.Random(1)
    ids = [rng.randrange(tok.vocab_size) for _ in range(5000)]
    assert tok.encode(tok.decode(ids)) == ids
    for i in range(len(SPECIAL_TOKENS), tok.vocab_size, 997):
        w = tok.id_to_word(i)
        assert w.isalpha() and w.islower() and " " not in w


def test_tokenizer_unknown_words_are_stable_and_in_range():
    tok = WordTokenizer(1000)
    a = tok.encode("Hello, world! ba")
    b = WordTokenizer(1000).encode("Hello,   world!\nba")
    assert a == b
    assert all(0 <= i < 1000 for i in a)
    assert len(a) == 3


def test_tokenizer_round_trip_100k_words():
    # its speed is benchmarks/bench_tokenizer.py's (figures, not a timed test)
    tok = WordTokenizer()
    assert tok.enable_fast()
    rng = random.Random(2)
    ids = [rng.randrange(tok.vocab_size) for _ in range(100_000)]
    assert tok.encode(tok.decode(ids)) == ids


def test_tokenizer_fast_path_matches_plain_path():
    fast, plain = WordTokenizer(), WordTokenizer()
    assert fast.enable_fast()
    rng = random.Random(5)
    odd = ["Hello", "x", "bab", "babababa", "ZZ", "ba,", "<|im_start|>", "<|user|>", "aa",
           "zuzuzu", "zuzuzv", "bb", "ab", "-", "zozozo"]
    for _ in range(60):
        parts = []
        for _ in range(rng.randrange(400, 900)):
            x = rng.random()
            if x < 0.7:
                parts.append(fast.id_to_word(rng.randrange(fast.vocab_size)))
            elif x < 0.85:
                parts.append(rng.choice(odd))
            else:
                parts.append("".join(rng.choice("abdeiouz") for _ in range(rng.randrange(1, 9))))
        seps = [rng.choice([" ", "  ", "\n", "\t", " \x1c", "\r\n"]) for _ in parts]
        text = "".join(p + s for p, s in zip(parts, seps))
        text = rng.choice(["", "  ", "\n"]) + text
        assert len(text) >= 2048
        assert fast.encode(text) == plain.encode(text)


def test_tokenizer_bad_ids():
    tok = get_tokenizer()
    with pytest.raises(ValueError):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(ValueError):
        tok.decode(["x"])  # type: ignore[list-item]


def test_chat_template_count():
    tok = get_tokenizer()
    msgs = [
        {"role": "system", "content": "ba be bi"},
        {"role": "user", "content": [{"type": "text", "text": "bo bu"}]},
    ]
    ids = tok.apply_chat_template(msgs)
    assert len(ids) == (3 + 3) + (2 + 3) + 2
    assert tok.encode(tok.decode(ids)) == ids
    assert len(tok.apply_chat_template(msgs, add_generation_prompt=False)) == len(ids) - 2
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError):
        tok.apply_chat_template([])


# -- hash chain --------------------------------------------------------------------------
def test_chunk_keys_chain_and_whole_chunks_only():
    ids = list(range(1000))
    keys = chunk_keys(ids, 256, b"m")
    assert len(keys) == 3  # 1000 // 256, the partial tail has no key
    assert len(set(keys)) == 3
    assert chunk_keys(ids[:255], 256, b"m") == []
    # a key depends on everything before it
    other = list(ids)
    other[0] = 999
    k2 = chunk_keys(other, 256, b"m")
    assert all(a != b for a, b in zip(keys, k2))
    # same prefix -> same leading keys
    assert chunk_keys(ids[:600] + [5] * 400, 256, b"m")[:2] == keys[:2]
    # namespace separates models
    assert chunk_keys(ids, 256, b"other")[0] != keys[0]
    assert chunk_keys(ids, 256, b"m") == keys  # deterministic


def test_prefix_cache_longest_leading_run():
    cache = PrefixCache(CpuTier(10**9), chunk_size=4, payload_scale=1 / 4096)
    ids = list(range(40))
    keys = cache.keys(ids)
    assert len(keys) == 10
    assert cache.store(keys[:5]) == 5
    assert cache.store(keys[:5]) == 0  # already present
    assert cache.lookup(keys) == 5
    assert cache.load(keys[:5]) == (5, [])
    cache.tier.evict(keys[2])
    assert cache.lookup(keys) == 2  # stops at the first gap
    # payload size follows the scale
    assert cache.payload_len == round(4 * 57_344 / 4096)


def test_prefix_cache_short_chunk_is_a_miss_wrong_bytes_are_loaded_and_reported():
    """A chunk that cannot be KV (wrong length) ends the hit and is evicted; one of the
    right length but other bytes is loaded (an engine cannot tell), its digest reported."""
    tier = CpuTier(10**9)
    cache = PrefixCache(tier, chunk_size=4)
    keys = cache.keys(list(range(12)))
    cache.store(keys)
    tier.put(keys[1], b"x" * cache.payload_len)  # same length, wrong bytes
    assert cache.lookup(keys) == 3
    n, wrong = cache.load(keys)
    assert n == 3 and len(wrong) == 1 and tier.contains(keys[1])
    assert cache.load(keys) == (n, wrong)  # the same bytes, the same digest
    tier.put(keys[1], b"x" * (cache.payload_len - 1))
    assert cache.load(keys) == (1, [])
    assert not tier.contains(keys[1])  # evicted


def test_none_tier_never_hits():
    cache = PrefixCache(NoneTier(), chunk_size=4)
    keys = cache.keys(list(range(12)))
    assert cache.store(keys) == 0
    assert cache.lookup(keys) == 0
    assert not cache.enabled


def test_cpu_tier_lru_eviction_by_bytes():
    tier = CpuTier(300)
    tier.put(b"a", b"1" * 100)
    tier.put(b"b", b"2" * 100)
    tier.put(b"c", b"3" * 100)
    assert tier.usage() == 300
    assert tier.get(b"a") is not None  # a is now most recent
    evicted = tier.put(b"d", b"4" * 100)
    assert evicted == [b"b"]
    assert tier.contains(b"a") and not tier.contains(b"b")
    assert tier.usage() == 300 and len(tier) == 3
    assert tier.put(b"big", b"x" * 301) == []  # larger than the tier: not stored
    assert not tier.contains(b"big")
    assert tier.evict(b"a") and tier.usage() == 200
    tier.clear()
    assert tier.usage() == 0 and len(tier) == 0


@pytest.mark.parametrize("odirect", [False, True])
def test_disk_tier_real_files_lru_and_verification(tmp_path, odirect):
    tier = DiskTier(str(tmp_path), capacity_bytes=3 * 100, use_odirect=odirect)
    for k in (b"k1", b"k2", b"k3"):
        tier.put(k, bytes([k[1]]) * 100)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(k.hex() + ".kvchunk" for k in (b"k1", b"k2", b"k3"))
    assert tier.get(b"k1") == b"1" * 100
    tier.put(b"k4", b"4" * 100)  # evicts k2 (k1 was read)
    assert not tier.contains(b"k2")
    assert not (tmp_path / (b"k2".hex() + ".kvchunk")).exists()
    # corrupt k3 on disk: a miss, and evicted
    path = tmp_path / (b"k3".hex() + ".kvchunk")
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert tier.get(b"k3") is None
    assert not tier.contains(b"k3") and not path.exists()
    # truncated file: a miss
    p1 = tmp_path / (b"k1".hex() + ".kvchunk")
    p1.write_bytes(p1.read_bytes()[:50])
    assert tier.get(b"k1") is None
    # a new tier over the same directory finds what is left
    again = DiskTier(str(tmp_path), capacity_bytes=1000)
    assert again.contains(b"k4") and again.get(b"k4") == b"4" * 100
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_disk_prefix_cache_round_trip(tmp_path):
    cache = PrefixCache(DiskTier(str(tmp_path), 10**9), chunk_size=256)
    keys = cache.keys(list(range(1000)))
    assert cache.store(keys) == 3
    assert len(list(tmp_path.glob("*.kvchunk"))) == 3
    assert cache.load(keys) == (3, [])
    assert cache.modeled_usage() == 3 * 256 * 57_344


# -- cost model --------------------------------------------------------------------------
def test_quick_profile_targets():
    p = PROFILES["quick"]
    assert p.prefill_ms(100, 100) == pytest.approx(3.0, abs=0.3)
    assert p.prefill_ms(10_000, 10_000) == pytest.approx(8.0, abs=0.5)
    assert p.prefill_ms(100_000, 100_000) == pytest.approx(60.0, abs=3)
    for n in (10_000, 100_000):
        cached = n // 256 * 256
        cold = p.ttft_model_ms("cpu", n, 0, cached)
        warm = {t: p.ttft_model_ms(t, n, cached, 0) for t in ("cpu", "gds", "disk")}
        assert warm["cpu"] <= 0.6 * cold
        assert warm["cpu"] < warm["gds"] < warm["disk"] < cold
        # a pure miss costs little more than no offload at all
        assert cold <= 1.1 * p.ttft_model_ms("none", n, 0, 0)


def test_decode_and_fixed_profile():
    p = PROFILES["quick"]
    assert p.itl_ms(1) == pytest.approx(5.2)
    assert p.itl_ms(16) == pytest.approx(8.2)
    f = make_profile("fixed", {"fixed_itl_ms": 3})
    assert f.itl_ms(100) == 3


def test_make_profile_overrides():
    p = make_profile("quick", {"prefill_base_ms": 10, "bandwidth_gbps": {"disk": 3}})
    assert p.prefill_base_ms == 10
    assert p.bandwidth_gbps["disk"] == 3 and p.bandwidth_gbps["cpu"] == PROFILES["quick"].bandwidth_gbps["cpu"]
    with pytest.raises(ValueError):
        make_profile("quick", {"nope": 1})
    with pytest.raises(ValueError):
        make_profile("turbo")


# -- CLI ---------------------------------------------------------------------------------
def test_cli_parses_and_rejects():
    from pytest_kvcache.emulator.__main__ import parse_settings

    s, _ = parse_settings(["--port", "1234", "--backend", "cpu", "--slowdown", "1.5",
                           "--config-json", '{"prefill_base_ms": 4, "use_odirect": true}'])
    assert s.port == 1234 and s.backend == "cpu" and s.slowdown == 1.5
    assert s.profile.prefill_base_ms == 4 and s.use_odirect is True
    s, _ = parse_settings(["--profile", "fixed", "--fixed-ttft-ms", "100", "--fixed-itl-ms", "2"])
    assert s.profile.kind == "fixed" and s.profile.fixed_ttft_ms == 100
    for bad in (["--backend", "tape"], ["--profile", "x"], ["--slowdown", "0"],
                ["--port", "70000"], ["--backend", "disk"], ["--config-json", "{"],
                ["--config-json", '{"bogus": 1}'], ["--chunk-size", "-1"]):
        with pytest.raises(SystemExit) as ei:
            parse_settings(bad)
        assert ei.value.code == 2, bad
