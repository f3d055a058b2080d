"""Fitting an emulator profile to a real server (``python -m pytest_kvcache calibrate``).

What is measured, with the plugin's own client at concurrency 1 (nothing queues):

- **cold**: for each input length, ``prompts`` random prompts the server has never
  seen; the median TTFT;
- **warm** (when the server has an offload tier): the same prompts again. vLLM's
  prefix cache is off (the plugin's default), so every hit comes from the tier;
- **decode**: the median inter-token latency at concurrency 1 and at
  ``decode_concurrency``.

What is fitted (the formulas are :mod:`pytest_kvcache.emulator.costmodel`'s):

- ``prefill_base_ms``, ``prefill_ms_per_token``, ``prefill_ms_per_token_sq`` (per 1000
  attended pairs), ``lookup_ms`` and the tier's bandwidth in one fit over the cold and
  warm medians, by non-negative least squares on *relative* errors, so a 100-token point
  weighs as much as a 10k one. A warm request computes its uncached tail over the whole
  context, so the warm points pin the attention term as well as the load
  (``time_scale`` 1: the model's own KV bytes per token, from its ``config.json``); a
  cold round on a tier includes its store cost, so the fitted profile stores for free;
- ``decode_base_ms`` and ``decode_ms_per_running_seq`` from the two ITLs.

The profile schedules one prefill at a time (``fifo``): right for a CPU server and for
a GPU at the concurrency measured; the built-in GPU profiles model batching.

Held-out lengths are measured but not fitted. The fit's prediction there, and the
median TTFT of an emulator started with the fitted profile and measured by the same
client, must be within ``tolerance`` of the real server's; otherwise the profile is
written beside the output as ``*.rejected.json`` and never where it would be used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ._http import StreamPool
from .backends import CHUNK_SIZE
from .emulator.costmodel import PROFILES, TIERS, Profile, attended_pairs
from .emulator.profile_file import write_profile_file
from .errors import KVCacheError
from .loadgen import LoadSpec, open_client, open_pool, run_round
from .models import RoundResult
from .servers import ServerPool, ServerSettings
from .workloads import (
    LocalTokenizer,
    Prompt,
    ServerTokenizer,
    TokenCodec,
    build_prompts,
)

__all__ = ["CalibrationError", "CalibrationPlan", "CalibrationRecord", "CalibrationResult", "Check", "DecodePoint",
           "LengthPoint", "Measurements", "TTFTFit", "cached_tokens", "calibrate", "check_profile",
           "emulator_overhead", "fit_profile", "fit_ttft", "measure", "predict_ttft_ms", "report_lines"]

#: Tiers the emulator can model (a calibrated tier must be one of them).
CALIBRATABLE_TIERS = tuple(t for t in TIERS if t != "waterfall")
#: A load that does not grow with the hit size is modeled as a lookup and this bandwidth.
INSTANT_BANDWIDTH_GBPS = 10_000.0
_DECODE_OUTPUT_LEN = 32
#: At least this many requests per decode round: the guard's 99th-percentile loop lag of a
#: round of two requests is its single worst sample.
_DECODE_PROMPTS = 8
#: Rounds the client's guard rejects are measured again, with new prompts, this many times in all.
_ATTEMPTS = 3
#: Trial indices of the prompts: pass i of the measured rounds uses i; these never meet them.
_WARMUP_TRIAL = 900
_DECODE_TRIAL = 910
#: Trial-index step of a new attempt's prompts (never the same ids as an earlier attempt's).
_RETRY_TRIAL = 1000


class CalibrationError(KVCacheError):
    """Calibration could not measure or fit; the message says what and the fix."""


@dataclass(frozen=True)
class CalibrationPlan:
    """What to measure; ``backend`` is the server's offload tier (``none``: cold only)."""

    input_lens: tuple[int, ...]
    holdout_lens: tuple[int, ...] = ()
    prompts: int = 8
    #: the prompts of each length are measured in this many passes over the lengths
    passes: int = 2
    output_len: int = 4
    backend: str = "none"
    chunk_size: int = CHUNK_SIZE
    decode_concurrency: int = 8
    tolerance: float = 0.15
    seed: int = 0
    api: str = "completions"

    def __post_init__(self) -> None:
        if len(set(self.input_lens)) < 3:
            raise CalibrationError("--input-lens: give at least 3 different lengths (3 coefficients are fitted)")
        if set(self.input_lens) & set(self.holdout_lens):
            raise CalibrationError("--holdout: a held-out length must not also be fitted (--input-lens)")
        if self.backend not in ("none", *CALIBRATABLE_TIERS):
            raise CalibrationError(f"--backend {self.backend!r}: the emulator models "
                                   f"{', '.join(('none', *CALIBRATABLE_TIERS))}")
        if self.backend != "none" and min(self.input_lens) <= self.chunk_size:
            raise CalibrationError(f"--input-lens: with an offload tier every length must exceed the chunk "
                                   f"size ({self.chunk_size}), or its warm round has nothing to load")
        if (self.prompts < 3 or self.passes < 1 or self.output_len < 2 or self.decode_concurrency < 2
                or not 0 < self.tolerance < 1):
            raise CalibrationError("need --prompts >= 3, --passes >= 1, --output-len >= 2, --decode-concurrency >= 2 "
                                   "and 0 < --tolerance < 1")

    @property
    def rounds(self) -> tuple[str, ...]:
        return ("cold",) if self.backend == "none" else ("cold", "warm")


@dataclass(frozen=True)
class LengthPoint:
    input_len: int
    round: str
    median_ttft_ms: float
    ttfts_ms: tuple[float, ...]
    held_out: bool = False


@dataclass(frozen=True)
class DecodePoint:
    concurrency: int
    median_itl_ms: float


@dataclass(frozen=True)
class Measurements:
    points: tuple[LengthPoint, ...]
    decode: tuple[DecodePoint, ...] = ()

    def fitted(self, round_name: str) -> list[LengthPoint]:
        return [p for p in self.points if p.round == round_name and not p.held_out]


@dataclass(frozen=True)
class Check:
    """One held-out length: the real median, the fit's prediction, the emulator's median."""

    input_len: int
    round: str
    measured_ms: float
    predicted_ms: float
    emulated_ms: float | None = None

    @property
    def predicted_error(self) -> float:
        return abs(self.predicted_ms - self.measured_ms) / self.measured_ms

    @property
    def emulated_error(self) -> float | None:
        return None if self.emulated_ms is None else abs(self.emulated_ms - self.measured_ms) / self.measured_ms

    def passes(self, tolerance: float) -> bool:
        return self.predicted_error <= tolerance and (self.emulated_error or 0.0) <= tolerance

    def as_dict(self) -> dict:
        return {"input_len": self.input_len, "round": self.round, "measured_ms": self.measured_ms,
                "predicted_ms": self.predicted_ms, "predicted_error": self.predicted_error,
                "emulated_ms": self.emulated_ms, "emulated_error": self.emulated_error}


# -- measuring ---------------------------------------------------------------------------------


async def measure(base_url: str, model: str, codec_for: Callable[[object], TokenCodec], plan: CalibrationPlan,
                  lengths: Sequence[int] | None = None, *, decode: bool = True,
                  progress: Callable[[str], None] = lambda _: None) -> Measurements:
    """Median TTFTs of ``lengths`` (default: the plan's fitted and held-out ones) in each round,
    and the decode ITLs. ``codec_for(client)`` gives the tokenizer (the client is the
    server's control-plane client, for a server-side tokenizer)."""
    lengths = sorted(set(lengths if lengths is not None else (*plan.input_lens, *plan.holdout_lens)))
    spec = LoadSpec(model=model, api=plan.api, max_concurrency=1, seed=plan.seed)
    pool = open_pool(base_url, max(1, plan.decode_concurrency))
    try:
        async with open_client(base_url) as client:
            session = _Session(pool, spec, codec_for(client), plan, progress)
            await session.warm_up(lengths)
            points = await session.length_points(lengths)
            decode_points = await session.decode_points(min(lengths)) if decode else []
    finally:
        pool.close()
    return Measurements(points=tuple(points), decode=tuple(decode_points))


class _Session:
    """One :func:`measure`: its pool, load, tokenizer and plan, and the rounds it sends."""

    def __init__(self, pool: StreamPool, spec: LoadSpec, codec: TokenCodec, plan: CalibrationPlan,
                 progress: Callable[[str], None]) -> None:
        self.pool = pool
        self.spec = spec
        self.codec = codec
        self.plan = plan
        self.progress = progress

    async def prompts(self, n: int, count: int, output_len: int, trial: int) -> list[Prompt]:
        return await build_prompts(self.codec, dataset="random", input_len=n, output_len=output_len,
                                   num_prompts=count, seed=self.plan.seed, trial=trial)

    async def trusted(self, what: str, attempt_rounds: Callable[[int], Awaitable[list[RoundResult]]]
                      ) -> list[RoundResult]:
        """Rounds the client's guard trusts: a spoiled attempt is measured again with new
        prompts (a neighbour's burst on a shared machine), up to _ATTEMPTS times."""
        reasons: list[str] = []
        for attempt in range(_ATTEMPTS):
            results = await attempt_rounds(attempt)
            reasons = [r.invalid_reason for r in results if r.invalid_reason]
            if not reasons:
                return results
            self.progress(f"{what}: not trustworthy ({reasons[0]}); measuring again with new prompts")
        raise CalibrationError(f"{what}: the client's guard rejected {_ATTEMPTS} attempts (last: "
                               f"{reasons[0]}); run calibrate on a quieter machine")

    async def warm_up(self, lengths: Sequence[int]) -> None:
        # A server's first requests of each new length pay one-off costs (kernels built for
        # new shapes: on vLLM's CPU build the first pass over the lengths ran 10-20% slower
        # than the second), and so do its first loads from the tier: not measured.
        plan = self.plan
        self.progress(f"warming the server up ({len(lengths)} lengths, {' and '.join(plan.rounds)})")
        for n in lengths:
            batch = await self.prompts(n, 2, 2, trial=_WARMUP_TRIAL)
            for round_name in plan.rounds:
                _no_failures(await run_round(self.pool, self.spec, batch, round_name), "warm-up", n)

    async def length_points(self, lengths: Sequence[int]) -> list[LengthPoint]:
        # The prompts of a length are split over passes that go up the lengths, then down:
        # a machine that drifts slower during the run slows every length alike, not the last ones.
        plan = self.plan
        ttfts: dict[tuple[int, str], list[float]] = {(n, r): [] for n in lengths for r in plan.rounds}
        for index, count in enumerate(_pass_sizes(plan.prompts, plan.passes)):
            for n in lengths if index % 2 == 0 else lengths[::-1]:
                async def length_rounds(attempt: int, n: int = n, index: int = index,
                                        count: int = count) -> list[RoundResult]:
                    batch = await self.prompts(n, count, plan.output_len, trial=index + _RETRY_TRIAL * attempt)
                    return [_no_failures(await run_round(self.pool, self.spec, batch, r), r, n) for r in plan.rounds]

                for result in await self.trusted(f"{n} tokens (pass {index + 1})", length_rounds):
                    ttfts[n, result.round] += [1000.0 * r.ttft for r in result.records]
        held_out = set(plan.holdout_lens)
        points = []
        for (n, round_name), values in ttfts.items():
            point = LengthPoint(n, round_name, statistics.median(values), tuple(values), held_out=n in held_out)
            points.append(point)
            self.progress(f"{round_name:4} {n:>6} tokens: median TTFT {point.median_ttft_ms:8.1f} ms"
                          f"{'  (held out)' if point.held_out else ''}")
        return points

    async def decode_points(self, short: int) -> list[DecodePoint]:
        """The median ITL alone and at the plan's decode concurrency, on the shortest length."""
        points = []
        for concurrency in (1, self.plan.decode_concurrency):
            async def decode_round(attempt: int, c: int = concurrency) -> list[RoundResult]:
                batch = await self.prompts(short, max(_DECODE_PROMPTS, 2 * c), _DECODE_OUTPUT_LEN,
                                           trial=_DECODE_TRIAL + c + _RETRY_TRIAL * attempt)
                result = await run_round(self.pool, replace(self.spec, max_concurrency=c), batch, "decode")
                return [_no_failures(result, "decode", short)]

            [result] = await self.trusted(f"decode at concurrency {concurrency}", decode_round)
            itl = result.summary.get("median_itl_ms")
            if itl is None:
                raise CalibrationError(f"the decode round at concurrency {concurrency} gave no "
                                       "inter-token latencies (does the server stream tokens?)")
            points.append(DecodePoint(concurrency, float(itl)))
            self.progress(f"decode at concurrency {concurrency}: median ITL {float(itl):.2f} ms")
        return points


def _pass_sizes(prompts: int, passes: int) -> list[int]:
    """``prompts`` split over ``passes`` as evenly as can be (no empty pass)."""
    passes = max(1, min(passes, prompts))
    return [prompts // passes + (1 if i < prompts % passes else 0) for i in range(passes)]


def _no_failures(result: RoundResult, what: str, input_len: int) -> RoundResult:
    """The round, or a CalibrationError if a request failed (retrying would not mend a server)."""
    failed = [r for r in result.records if not r.success]
    if failed:
        raise CalibrationError(f"{what} round at {input_len} tokens: {len(failed)} of {len(result.records)} "
                               f"requests failed (first: {failed[0].error}); fix the server or the lengths "
                               "(--max-model-len must exceed the longest prompt)")
    return result


# -- fitting -----------------------------------------------------------------------------------


def cached_tokens(input_len: int, chunk_size: int) -> int:
    """Tokens a warm request loads: its whole chunks (LMCache's and the emulator's rule)."""
    return input_len // chunk_size * chunk_size


def predict_ttft_ms(profile: Profile, tier: str, input_len: int, round_name: str, chunk_size: int) -> float:
    """The profile's TTFT of one request alone on the server (no queueing, no store cost)."""
    cached = cached_tokens(input_len, chunk_size) if round_name == "warm" and tier != "none" else 0
    return profile.prefill_ms(input_len - cached, input_len) + (profile.load_ms(tier, cached) if cached else 0.0)


def _relative_nnls(rows: Sequence[Sequence[float]], targets: Sequence[float],
                   weights: Sequence[float]) -> list[float]:
    """Non-negative coefficients minimizing sum(((row . x - target) / weight)^2)."""
    import numpy as np
    from scipy.optimize import nnls

    a = np.asarray(rows, dtype=float) / np.asarray(weights, dtype=float)[:, None]
    b = np.asarray(targets, dtype=float) / np.asarray(weights, dtype=float)
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, b)  # columns scaled alike, or the n^2 column swamps the others
    return [float(v) for v in x / scale]


@dataclass(frozen=True)
class TTFTFit:
    """The TTFT coefficients of the cost model (``per_pair_ms``: per 1000 attended pairs)."""

    base_ms: float
    per_token_ms: float
    per_pair_ms: float
    lookup_ms: float = 0.0
    ms_per_byte: float = 0.0

    def minus(self, other: TTFTFit) -> TTFTFit:
        """Each coefficient less ``other``'s, never below zero (the emulator's own overhead
        comes off the server's, or an emulator running the profile would count it twice)."""
        return TTFTFit(*(max(0.0, a - b) for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def bandwidth_gbps(self) -> float:
        return min(INSTANT_BANDWIDTH_GBPS, 1e-6 / self.ms_per_byte) if self.ms_per_byte > 0 else INSTANT_BANDWIDTH_GBPS


def fit_ttft(measurements: Measurements, plan: CalibrationPlan, kv_bytes_per_token: int) -> TTFTFit:
    """One fit over the cold and warm fitted points: a warm round computes its uncached
    tail over the whole context, so it pins the attention term as well as the load."""
    cold = measurements.fitted("cold")
    if len({p.input_len for p in cold}) < 3:
        raise CalibrationError("fewer than 3 cold input lengths were measured; nothing to fit")
    points = cold + (measurements.fitted("warm") if plan.backend != "none" else [])
    rows: list[tuple[float, ...]] = []
    for p in points:
        n = p.input_len
        cached = cached_tokens(n, plan.chunk_size) if p.round == "warm" else 0
        computed = n - cached
        rows.append((1.0, computed, attended_pairs(computed, n) / 1000.0, 1.0 if cached else 0.0,
                     float(cached * kv_bytes_per_token)))
    if plan.backend == "none":
        rows = [row[:3] for row in rows]
    times = [p.median_ttft_ms for p in points]
    return TTFTFit(*_relative_nnls(rows, times, times))


def fit_profile(measurements: Measurements, plan: CalibrationPlan, *, name: str, kv_bytes_per_token: int,
                description: str = "", overhead: TTFTFit | None = None) -> Profile:
    """The fifo profile whose formulas best reproduce the fitted (not held-out) points,
    less ``overhead`` (what an emulator adds by itself, see :func:`calibrate`)."""
    fit = fit_ttft(measurements, plan, kv_bytes_per_token)
    if overhead is not None:
        fit = fit.minus(overhead)
    profile = replace(
        PROFILES["quick"], name=name, description=description, scheduler="fifo", time_scale=1.0,
        kv_bytes_per_token=int(kv_bytes_per_token), prefill_base_ms=fit.base_ms,
        prefill_ms_per_token=fit.per_token_ms, prefill_ms_per_token_sq=fit.per_pair_ms, store_base_ms=0.0,
        store_fraction=0.0)
    if plan.backend != "none":
        profile = replace(profile, lookup_ms=fit.lookup_ms,
                          bandwidth_gbps={**profile.bandwidth_gbps, plan.backend: fit.bandwidth_gbps})
    by_concurrency = {d.concurrency: d.median_itl_ms for d in measurements.decode}
    if 1 in by_concurrency and plan.decode_concurrency in by_concurrency:
        alone, busy = by_concurrency[1], by_concurrency[plan.decode_concurrency]
        per_seq = max(0.0, (busy - alone) / (plan.decode_concurrency - 1))
        profile = replace(profile, decode_base_ms=max(0.0, alone - per_seq), decode_ms_per_running_seq=per_seq)
    return profile


def check_profile(profile: Profile, real: Measurements, plan: CalibrationPlan,
                  emulated: Measurements | None = None) -> list[Check]:
    """The held-out comparisons (every measured point when nothing was held out)."""
    points = [p for p in real.points if p.held_out] or list(real.points)
    emulated_ms = {(p.input_len, p.round): p.median_ttft_ms for p in (emulated.points if emulated else ())}
    return [Check(p.input_len, p.round, p.median_ttft_ms,
                  predict_ttft_ms(profile, plan.backend, p.input_len, p.round, plan.chunk_size),
                  emulated_ms.get((p.input_len, p.round)))
            for p in points]


@dataclass(frozen=True)
class CalibrationRecord:
    """What a profile file says about how its profile was made."""

    server: dict
    plan: CalibrationPlan
    real: Measurements
    checks: tuple[Check, ...]
    emulator_overhead: TTFTFit | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def passes(self) -> bool:
        return all(c.passes(self.plan.tolerance) for c in self.checks)

    def as_dict(self) -> dict:
        return {
            "created": self.created, "server": self.server,
            "plan": dataclasses.asdict(self.plan),
            "points": [dataclasses.asdict(p) for p in self.real.points],
            "decode": [dataclasses.asdict(d) for d in self.real.decode],
            "checks": [c.as_dict() for c in self.checks],
            "emulator_overhead": dataclasses.asdict(self.emulator_overhead) if self.emulator_overhead else None,
            "within_tolerance": self.passes(),
        }


# -- the whole command -------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationResult:
    profile: Profile
    record: CalibrationRecord
    path: Path  # the profile file, or the rejected one


def _codec_factory(tokenizer: str | None, model: str) -> Callable[[object], TokenCodec]:
    local: TokenCodec | None = LocalTokenizer(tokenizer) if tokenizer else None

    def codec_for(client: object) -> TokenCodec:
        return local or ServerTokenizer(client, model)

    return codec_for


def calibrate(plan: CalibrationPlan, server: ServerSettings, *, out: Path, work_dir: Path,
              tokenizer: str | None = None, kv_bytes_per_token: int | None = None, name: str | None = None,
              verify: bool = True, progress: Callable[[str], None] = lambda _: None) -> CalibrationResult:
    """Measure ``server`` (started here unless external), fit, check on the held-out lengths
    (with an emulator running the fitted profile when ``verify``), write the profile file."""
    if kv_bytes_per_token is None:
        if plan.backend != "none":
            raise CalibrationError("a warm round needs the model's KV bytes per token: pass --model-config "
                                   "(its config.json) or --kv-bytes-per-token")
        kv_bytes_per_token = PROFILES["quick"].kv_bytes_per_token  # moves nothing without a tier
    real_pool = ServerPool(server, work_dir / "real", work_dir / "logs")
    try:
        handle = real_pool.acquire(real_pool.backend(plan.backend))
        progress(f"measuring {handle.info.get('server', server.kind)} at {handle.base_url} (model {handle.model}, "
                 f"backend {plan.backend})")
        real = asyncio.run(measure(handle.base_url, handle.model, _codec_factory(tokenizer, handle.model), plan,
                                   progress=progress))
        server_info = {"base_url": handle.base_url, "model": handle.model, **dict(handle.info)}
    finally:
        real_pool.close()
    name = name or f"calibrated-{Path(handle.model).name or 'model'}"
    description = f"fitted by pytest-kvcache calibrate to {server_info.get('server', server.kind)} serving " \
                  f"{handle.model}"
    overhead = emulated = None
    if verify:
        # An emulator adds its own time to the modeled one (HTTP, JSON, tokenizing, real tier
        # I/O, waking up): measured at the fitted lengths on one running the first fit, it
        # comes off the fit, or an emulator running the profile would count it twice.
        rough = fit_profile(real, plan, name=name, kv_bytes_per_token=kv_bytes_per_token)
        progress("measuring the emulator's own overhead on the fitted lengths")
        overhead = emulator_overhead(rough, plan, _emulate(rough, plan, plan.input_lens, server, work_dir, progress))
    profile = fit_profile(real, plan, name=name, kv_bytes_per_token=kv_bytes_per_token, description=description,
                          overhead=overhead)
    if verify:
        progress("verifying: an emulator running the fitted profile")
        emulated = _emulate(profile, plan, plan.holdout_lens or plan.input_lens, server, work_dir, progress)
    record = CalibrationRecord(server=server_info, plan=plan, real=real,
                               checks=tuple(check_profile(profile, real, plan, emulated)), emulator_overhead=overhead)
    path = out if record.passes() else out.with_name(f"{out.name.removesuffix('.json')}.rejected.json")
    write_profile_file(path, profile, record.as_dict())
    return CalibrationResult(profile=profile, record=record, path=path)


def emulator_overhead(profile: Profile, plan: CalibrationPlan, emulated: Measurements) -> TTFTFit:
    """What an emulator running ``profile`` measured beyond the profile's own TTFT: a base,
    a per-token part (tokenizing, JSON) and, warm, a lookup part (the tier's real I/O)."""
    points = emulated.fitted("cold") + emulated.fitted("warm")
    rows = [(1.0, float(p.input_len), 1.0 if p.round == "warm" else 0.0) for p in points]
    extra = [p.median_ttft_ms - predict_ttft_ms(profile, plan.backend, p.input_len, p.round, plan.chunk_size)
             for p in points]
    base, per_token, lookup = _relative_nnls(rows, extra, [p.median_ttft_ms for p in points])
    return TTFTFit(base_ms=base, per_token_ms=per_token, per_pair_ms=0.0, lookup_ms=lookup)


def _emulate(profile: Profile, plan: CalibrationPlan, lengths: Sequence[int], server: ServerSettings,
             work_dir: Path, progress: Callable[[str], None]) -> Measurements:
    """Median TTFTs of an emulator running ``profile`` with the plan's tier and chunk size."""
    candidate = write_profile_file(work_dir / f"{profile.name}.candidate.json", profile, {})
    pool = ServerPool(ServerSettings(kind="emulator", emulator_profile=str(candidate),
                                     ready_timeout=server.ready_timeout,
                                     extra_args=("--chunk-size", str(plan.chunk_size))),
                      work_dir / "emulator", work_dir / "logs")
    try:
        emulator = pool.acquire(pool.backend(plan.backend))
        return asyncio.run(measure(emulator.base_url, emulator.model, _codec_factory(None, emulator.model), plan,
                                   lengths=lengths, decode=False, progress=progress))
    finally:
        pool.close()
        candidate.unlink(missing_ok=True)


def report_lines(result: CalibrationResult) -> list[str]:
    """The fit and the held-out table, for the terminal."""
    p, plan = result.profile, result.record.plan
    lines = [(f"profile {p.name}: prefill = {p.prefill_base_ms:.3g} ms + {p.prefill_ms_per_token:.3g} ms/token "
              f"+ {p.prefill_ms_per_token_sq:.3g} ms per 1000 attended pairs; decode = {p.decode_base_ms:.3g} ms "
              f"+ {p.decode_ms_per_running_seq:.3g} ms x running")]
    if plan.backend != "none":
        lines.append(f"  tier {plan.backend}: lookup {p.lookup_ms:.3g} ms, {p.bandwidth_gbps[plan.backend]:.3g} GB/s "
                     f"of {p.kv_bytes_per_token} KV bytes/token")
    overhead = result.record.emulator_overhead
    if overhead is not None:
        lines.append(f"  less the emulator's own overhead: {overhead.base_ms:.3g} ms + {overhead.per_token_ms:.3g} "
                     f"ms/token + {overhead.per_pair_ms:.3g} ms per 1000 pairs"
                     + (f", lookup {overhead.lookup_ms:.3g} ms" if plan.backend != "none" else ""))
    header = ("input_len", "round", "measured_ms", "fit_ms", "fit_err", "emulator_ms", "emu_err", "")
    rows = []
    for c in result.record.checks:
        emu_err = c.emulated_error
        rows.append((str(c.input_len), c.round, f"{c.measured_ms:.1f}", f"{c.predicted_ms:.1f}",
                     f"{100 * c.predicted_error:.1f}%", "-" if c.emulated_ms is None else f"{c.emulated_ms:.1f}",
                     "-" if emu_err is None else f"{100 * emu_err:.1f}%",
                     "ok" if c.passes(plan.tolerance) else f"beyond {100 * plan.tolerance:.0f}%"))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    held = "held-out lengths" if plan.holdout_lens else "fitted lengths (nothing held out)"
    lines.append(f"check on the {held}:")
    lines += ["  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in (header, *rows)]
    return lines
