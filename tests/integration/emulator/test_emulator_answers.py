"""The emulator's answers follow the KV it loads (issue 16, offload correctness).

Answers are greedy: a function of the prompt's token ids, so a warm request that loads
honest KV answers as its cold recomputation did, whatever the backend or profile; a
chunk loaded with other bytes than its true KV (``--corrupt-rate``, corruption under a
valid CRC) changes the answer.  ``cache_salt`` separates cached chunks, not answers.
"""

from __future__ import annotations

import httpx
import pytest
from helpers.emulator import MODEL, random_ids, stream, wait_for

from pytest_kvcache.emulator.prefix_cache import PrefixCache
from pytest_kvcache.emulator.tiers import CpuTier, unframe
from pytest_kvcache.emulator.tokenizer import get_tokenizer

ONE_K = 1000
CHUNKS_1K = ONE_K // 256  # 3 whole chunks (768 tokens) and a 232-token tail


def answer(url: str, prompt, max_tokens: int = 16, **extra) -> tuple[str, dict]:
    """The text and ``emulator_timing`` of a non-streamed completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    d = r.json()
    return d["choices"][0]["text"], d["emulator_timing"]


def stored(emu, chunks: int) -> None:
    """Wait until the tier holds ``chunks`` chunks (written, not in the write buffer)."""
    wait_for(lambda: emu.metric("emulator:tier_chunks") >= chunks)


def corrupt_keys(ids: list[int], rate: float, seed: int = 0) -> list[bool]:
    """Which chunks of ``ids`` an emulator of the test model stores altered."""
    cache = PrefixCache(CpuTier(1), namespace=MODEL, corrupt_rate=rate, seed=seed)
    return [cache.corrupts(k) for k in cache.keys(ids)]


# -- greedy, content-derived answers -------------------------------------------------------
def test_same_prompt_same_answer_without_a_tier(emu_factory):
    emu = emu_factory("--backend", "none", "--log-level", "warning")
    ids = random_ids(ONE_K, 1)
    first, _ = answer(emu.url, ids)
    assert len(first.split()) == 16
    assert answer(emu.url, ids)[0] == first  # not a function of the request's number
    # temperature and the request's seed are accepted and change nothing (greedy)
    assert answer(emu.url, ids, temperature=0.8, seed=7)[0] == first
    # the answer is a function of every token, the partial tail chunk's included
    tail = list(ids)
    tail[-1] = 7 if tail[-1] == 6 else 6
    assert answer(emu.url, tail)[0] != first
    assert answer(emu.url, random_ids(ONE_K, 2))[0] != first
    # streamed, the same words
    events = stream(emu.url, {"model": MODEL, "prompt": ids, "max_tokens": 16, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events if e and e["choices"]) == first
    # greedy decoding: a shorter answer is the longer one's beginning
    assert first.startswith(answer(emu.url, ids, max_tokens=4)[0])
    # the same prompt as text gives the same ids, so the same answer
    text = get_tokenizer(32000).decode(ids)
    assert answer(emu.url, text)[0] == first
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    replies = [httpx.post(emu.url + "/v1/chat/completions", json=chat, timeout=30).json() for _ in range(2)]
    assert replies[0]["choices"][0]["message"]["content"] == replies[1]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("backend", ["cpu", "disk", "waterfall"])
def test_warm_answer_equals_the_cold_one(emu_factory, tmp_path, backend):
    emu = emu_factory("--backend", backend, "--disk-path", str(tmp_path / "kv"), "--log-level", "warning")
    for seed in (10, 11):
        ids = random_ids(ONE_K, seed)
        cold, t_cold = answer(emu.url, ids)
        buffered, t_buf = answer(emu.url, ids)  # maybe served from the write buffer
        stored(emu, (seed - 9) * CHUNKS_1K)
        warm, t_warm = answer(emu.url, ids)  # read back from the tier
        assert t_cold["cached_tokens"] == 0
        assert t_buf["cached_tokens"] == t_warm["cached_tokens"] == CHUNKS_1K * 256
        assert buffered == warm == cold
    hits = {k: v for k, v in emu.metrics().items() if k.startswith("emulator:tier_hit_tokens_total")}
    assert sum(hits.values()) == 4 * CHUNKS_1K * 256, hits
    assert emu.metric("emulator:corrupted_chunks_total") == 0


# -- corrupt offloads ------------------------------------------------------------------------
def test_corrupt_rate_changes_the_warm_answers_that_load_altered_chunks(emu_factory):
    emu = emu_factory("--backend", "cpu", "--corrupt-rate", "0.5")
    prompts = [random_ids(ONE_K, 100 + i) for i in range(16)]
    colds = [answer(emu.url, ids)[0] for ids in prompts]
    stored(emu, 16 * CHUNKS_1K)
    warms = []
    for ids in prompts:
        text, timing = answer(emu.url, ids)
        assert timing["cached_tokens"] == CHUNKS_1K * 256  # the tier's framing does not see it
        warms.append(text)
    bad = [corrupt_keys(ids, 0.5) for ids in prompts]
    assert [w != c for w, c in zip(warms, colds)] == [any(b) for b in bad]
    assert sum(w != c for w, c in zip(warms, colds)) >= 10  # most (14 expected of 16)
    assert emu.metric("emulator:corrupted_chunks_total") == sum(map(sum, bad)) > 0
    # the corrupt chunks stay: the same wrong answer again (no verification evicts them)
    i = next(i for i, b in enumerate(bad) if any(b))
    assert answer(emu.url, prompts[i])[0] == warms[i]
    log = emu.log()
    assert "fault injection" in log and "--corrupt-rate" in log
    assert "failed verification" not in log


def test_corrupt_rate_one_on_disk_passes_the_crc_and_changes_the_answer(emu_factory, tmp_path):
    disk = tmp_path / "kv"
    emu = emu_factory("--backend", "disk", "--disk-path", str(disk), "--corrupt-rate", "1")
    ids = random_ids(ONE_K, 200)
    cold, _ = answer(emu.url, ids)
    stored(emu, CHUNKS_1K)
    warm, timing = answer(emu.url, ids)
    assert timing["cached_tokens"] == CHUNKS_1K * 256  # every frame passed its CRC: a hit
    assert warm != cold
    cache = PrefixCache(CpuTier(1), namespace=MODEL)
    for key in cache.keys(ids):
        payload = unframe((disk / (key.hex() + ".kvchunk")).read_bytes())
        assert payload is not None and len(payload) == cache.payload_len and payload != cache.payload(key)
    assert emu.metric("emulator:corrupted_chunks_total") == CHUNKS_1K
    # right after the cold request the chunks may still be in the write buffer: also corrupt
    other = random_ids(ONE_K, 201)
    cold2, _ = answer(emu.url, other)
    assert answer(emu.url, other)[0] != cold2
    assert "failed verification" not in emu.log()


@pytest.mark.parametrize("profile", [
    ("--profile", "fixed"),
    ("--profile", "a100-qwen2.5-7b", "--slowdown", "0.1"),  # the batched scheduler
])
def test_corrupt_answers_in_the_fixed_and_batched_profiles(emu_factory, profile):
    emu = emu_factory("--backend", "cpu", "--corrupt-rate", "1", "--log-level", "warning", *profile)
    honest = emu_factory("--backend", "cpu", "--log-level", "warning", *profile)
    ids = random_ids(ONE_K, 300)
    cold, _ = answer(emu.url, ids)
    stored(emu, CHUNKS_1K)
    warm, timing = answer(emu.url, ids)
    assert timing["cached_tokens"] == CHUNKS_1K * 256 and warm != cold
    cold_h, _ = answer(honest.url, ids)
    stored(honest, CHUNKS_1K)
    warm_h, timing_h = answer(honest.url, ids)
    assert timing_h["cached_tokens"] == CHUNKS_1K * 256 and warm_h == cold_h == cold


# -- cache_salt ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_emu(emu_factory):
    return emu_factory("--backend", "cpu", "--log-level", "warning")


def test_cache_salt_separates_the_cache_not_the_answers(cpu_emu):
    emu = cpu_emu
    ids = random_ids(ONE_K, 400)
    # a text prompt long enough to be remembered (ids and keys): the memo keys on the salt
    text = get_tokenizer(32000).decode(random_ids(5000, 401))
    assert len(text) >= 20_000
    for prompt in (ids, text):
        cold, t = answer(emu.url, prompt)
        assert t["cached_tokens"] == 0
        salted, t = answer(emu.url, prompt, cache_salt="tenant-a")
        assert t["cached_tokens"] == 0 and salted == cold
        again, t = answer(emu.url, prompt, cache_salt="tenant-a")
        assert t["cached_tokens"] > 0 and again == cold
        other, t = answer(emu.url, prompt, cache_salt="tenant-b")
        assert t["cached_tokens"] == 0 and other == cold
        plain, t = answer(emu.url, prompt)
        assert t["cached_tokens"] > 0 and plain == cold
    # a null salt is no salt
    assert answer(emu.url, ids, cache_salt=None)[1]["cached_tokens"] == CHUNKS_1K * 256


@pytest.mark.parametrize("salt", [5, "", "x" * 257, ["a"], {"a": 1}, True])
def test_bad_cache_salt_is_400(cpu_emu, salt):
    emu = cpu_emu
    body = {"model": MODEL, "prompt": "ba be", "max_tokens": 1, "cache_salt": salt}
    for path in ("/v1/completions", "/v1/chat/completions"):
        if path.endswith("chat/completions"):
            body = dict(body, messages=[{"role": "user", "content": "ba"}])
            del body["prompt"]
        r = httpx.post(emu.url + path, json=body)
        assert r.status_code == 400, (salt, r.text)
        assert "cache_salt" in r.json()["error"]["message"]
    ok = dict(body, cache_salt="x" * 256)
    assert httpx.post(emu.url + "/v1/chat/completions", json=ok).status_code == 200
