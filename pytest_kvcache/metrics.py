"""Request records -> a round's summary, with ``vllm bench serve``'s field names.

Definitions (as in vLLM's benchmark): TTFT is the time from the request's start to
the first chunk with text; E2E latency to the last chunk with text; TPOT is
(E2E - TTFT) / (output tokens - 1) per request; ITL is every gap between consecutive
text chunks. Percentiles use linear interpolation (numpy's default, as vLLM does).
Latencies are in milliseconds, throughputs per second of the round's duration.

Goodput (``request_goodput``) is vLLM's: completed requests meeting every given SLO
(``ttft``, ``tpot``, ``e2el`` in ms; a one-token request has TPOT 0) per second.

A metric with no samples (TPOT and ITL when one token is generated) is ``None``,
never 0, so an undefined figure cannot be mistaken for a measured one.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence

from .models import RequestRecord

__all__ = ["DEFAULT_PERCENTILES", "goodput", "parse_percentiles", "percentile", "request_details", "summarize"]

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile of already sorted values (numpy's default)."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> (50.0, 90.0, 99.0); ValueError naming the accepted form."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            q = float(part)
        except ValueError:
            raise ValueError(f"{text!r}: use comma-separated percentiles between 0 and 100, e.g. 50,90,99") from None
        if not 0 < q <= 100:
            raise ValueError(f"{text!r}: {part} is not a percentile between 0 (excluded) and 100")
        if q not in out:
            out.append(q)
    return tuple(out)


def goodput(records: Sequence[RequestRecord], duration: float, slos: Mapping[str, float]) -> float | None:
    """Requests per second that completed within every SLO (ms), as vLLM counts them."""
    if duration <= 0:
        return None
    good = 0
    for r in records:
        if not r.success:
            continue
        measured = {"ttft": r.ttft * 1000.0, "tpot": (r.tpot or 0.0) * 1000.0, "e2el": r.e2el * 1000.0}
        if all(measured[k] <= v for k, v in slos.items()):
            good += 1
    return good / duration


def _pct_name(q: float) -> str:
    return f"p{int(q)}" if float(q).is_integer() else f"p{q:g}"


def _describe(prefix: str, values_s: Iterable[float], percentiles: Sequence[float], out: dict) -> None:
    values = sorted(v * 1000.0 for v in values_s)
    keys = ["mean", "median", "std", *(_pct_name(q) for q in percentiles)]
    if not values:
        out.update({f"{k}_{prefix}_ms": None for k in keys})
        return
    out[f"mean_{prefix}_ms"] = statistics.fmean(values)
    out[f"median_{prefix}_ms"] = percentile(values, 50.0)
    out[f"std_{prefix}_ms"] = statistics.pstdev(values) if len(values) > 1 else 0.0
    for q in percentiles:
        out[f"{_pct_name(q)}_{prefix}_ms"] = percentile(values, q)


def summarize(records: Sequence[RequestRecord], duration: float,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              slos: Mapping[str, float] | None = None) -> dict[str, float | int | None]:
    ok = [r for r in records if r.success]
    input_tokens = sum(r.prompt_tokens_reported if r.prompt_tokens_reported is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, float | int | None] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else None,
        "output_throughput": output_tokens / duration if duration > 0 else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else None,
    }
    _describe("ttft", (r.ttft for r in ok), percentiles, summary)
    _describe("tpot", (t for r in ok if (t := r.tpot) is not None), percentiles, summary)
    _describe("itl", (gap for r in ok for gap in r.itls), percentiles, summary)
    _describe("e2el", (r.e2el for r in ok), percentiles, summary)
    queue = [r.queue_wait * 1000.0 for r in records]
    summary["mean_queue_ms"] = statistics.fmean(queue) if queue else None
    summary["max_queue_ms"] = max(queue) if queue else None
    if slos:
        summary["request_goodput"] = goodput(records, duration, slos)
    return summary


def request_details(records: Sequence[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request lists (``--save-detailed``): seconds, as vLLM stores them."""
    return {
        "ttfts": [r.ttft if r.success else 0.0 for r in records],
        "itls": [list(r.itls) if r.success else [] for r in records],
        "input_lens": [r.prompt_tokens_reported if r.prompt_tokens_reported is not None else r.prompt_len
                       for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "errors": [r.error or "" for r in records],
    }
