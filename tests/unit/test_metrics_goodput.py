"""Requested percentiles and goodput against SLOs, as vLLM reports them."""

from __future__ import annotations

import pytest

from pytest_kvcache.metrics import goodput, parse_percentiles, summarize
from pytest_kvcache.models import RequestRecord


def rec(i, ttft, gap, n, error=None):
    start = 10.0 * i
    times = tuple(start + ttft + gap * k for k in range(n))
    return RequestRecord(index=i, prompt_len=100, output_len_requested=n, scheduled=start, start=start,
                         end=times[-1], chunk_times=times if error is None else (),
                         chunk_tokens=(1,) * n if error is None else (), error=error)


RECORDS = [rec(0, 0.1, 0.01, 11), rec(1, 0.3, 0.01, 11), rec(2, 0.1, 0.05, 11), rec(3, 0.1, 0.01, 1),
           rec(4, 0.1, 0.01, 5, error="HTTP 500")]


def test_goodput_counts_requests_meeting_every_slo():
    assert goodput(RECORDS, 2.0, {"ttft": 200}) == 3 / 2  # the failed one never counts
    assert goodput(RECORDS, 2.0, {"ttft": 200, "tpot": 20}) == 2 / 2  # one token: TPOT 0, as vLLM
    assert goodput(RECORDS, 2.0, {"e2el": 250}) == 2 / 2  # 100 + 10*10 = 200 ms and the 1-token one
    assert goodput(RECORDS, 0.0, {"ttft": 1}) is None


def test_summary_has_goodput_only_with_slos_and_requested_percentiles():
    plain = summarize(RECORDS, 2.0)
    assert "request_goodput" not in plain and "p99_ttft_ms" in plain
    s = summarize(RECORDS, 2.0, (50, 95, 99.9), {"ttft": 200})
    assert s["request_goodput"] == 1.5
    assert {"p50_ttft_ms", "p95_ttft_ms", "p99.9_ttft_ms", "p95_itl_ms"} <= set(s)
    assert "p99_ttft_ms" not in s
    assert s["p50_ttft_ms"] == pytest.approx(s["median_ttft_ms"])


@pytest.mark.parametrize("text,value", [("50,90,99", (50.0, 90.0, 99.0)), ("99.9", (99.9,)),
                                        (" 95 , 99 ,95", (95.0, 99.0)), ("100", (100.0,))])
def test_parse_percentiles(text, value):
    assert parse_percentiles(text) == value


@pytest.mark.parametrize("text", ["", "p99", "0", "101", "50,,90", "-5"])
def test_bad_percentiles(text):
    with pytest.raises(ValueError, match="percentile"):
        parse_percentiles(text)
