"""The load generator's pure parts: seeded arrivals, the delivered-concurrency math, and a long
response decoded in slices."""

from __future__ import annotations

import itertools
import statistics

import pytest

from pytest_kvcache import loadgen


def test_arrivals_are_seeded() -> None:
    a = loadgen._arrival_offsets(50, 10.0, seed=1)
    assert a == loadgen._arrival_offsets(50, 10.0, seed=1)
    assert a != loadgen._arrival_offsets(50, 10.0, seed=2)
    assert a[0] == 0.0 and all(x < y for x, y in itertools.pairwise(a))
    assert 2.0 < a[-1] < 10.0  # about 49 gaps of 0.1 s
    g = loadgen._arrival_offsets(2000, 10.0, seed=1, burstiness=0.5)
    assert g == loadgen._arrival_offsets(2000, 10.0, seed=1, burstiness=0.5)
    gaps = [y - x for x, y in itertools.pairwise(g)]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.1)
    assert statistics.pstdev(gaps) > 0.12  # burstier than Poisson (whose std equals the mean)
    assert loadgen._arrival_offsets(3, float("inf"), seed=1) == [0.0, 0.0, 0.0]


def test_delivered_concurrency_math() -> None:
    # 2 slots; one request waits from t=0 to t=2 while only 1 is in flight for 1 s of it
    runs = [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0)]
    waits = [(0.0, 2.0)]
    mean, span = loadgen._delivered_concurrency(runs, waits)
    assert span == pytest.approx(2.0) and mean == pytest.approx(1.5)
    assert loadgen._delivered_concurrency(runs, []) == (None, 0.0)


def test_a_long_response_is_decoded_in_slices_that_add_up_to_the_whole() -> None:
    def event(k: int) -> bytes:
        return (b'data: {"choices":[{"text":" w%d"}],"usage":{"prompt_tokens":3,"completion_tokens":%d}}\n\n'
                % (k, 2 * (k + 1)))

    n = 100
    pieces = [(float(k), event(k)) for k in range(40)]  # one read per event
    pieces.append((40.0, b"".join(event(k) for k in range(40, n))))  # a read where 60 events piled up
    pieces.append((41.0, b"data: [DONE]\n\ntrailing"))
    chunk_times: list[float] = []
    chunk_tokens: list[int] = []
    steps = loadgen._decode(pieces, chunk_times, chunk_tokens, {}, {})
    grown = []
    while True:
        before = len(chunk_times)
        try:
            next(steps)
        except StopIteration as stop:
            done, rest = stop.value
            break
        grown.append(len(chunk_times) - before)
    assert max(grown) <= loadgen.DECODE_SLICE and len(grown) >= n // loadgen.DECODE_SLICE
    assert done and rest == b"trailing"
    assert chunk_times == [float(k) for k in range(40)] + [40.0] * (n - 40)
    assert chunk_tokens == [2] * n  # from continuous usage: two tokens per chunk
