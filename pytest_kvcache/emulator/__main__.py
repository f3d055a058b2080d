"""Command line of the emulator: ``python -m pytest_kvcache.emulator --port P ...``.

Serves until SIGTERM or SIGINT, then stops cleanly (exit status 0).  Logs go to
stderr: emulator lines in vLLM's style and LMCache-style lines
(``LMCache INFO: Retrieved 776 out of total 776 tokens``).  ``--log-level warning``
silences the per-request lines (a caller that pipes stderr without reading it should
use it, or send stderr to a file).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence

from .. import __version__
from .._openai_request import (
    RequestLimits,
    add_limit_options,
    checked_argument,
    nonneg_float,
    positive_float,
    positive_int,
)
from .costmodel import PROFILES, TIERS
from .profile_file import ProfileFileError, is_profile_path, resolve_profile
from .settings import EMULATOR_KEYS, Settings


#: the interpreter's thread switch interval in the emulator process (seconds; see _serve)
WRITER_SWITCH_INTERVAL_S = 0.05
#: aiohttp's parser refuses (400) a request line or header line longer than this ...
AIOHTTP_MAX_LINE = 8190
#: ... and more header lines than this (so it never holds more than ~1 MB of one head)
AIOHTTP_MAX_HEADERS = 128


def _profile_spec(text: str) -> str:
    """A built-in profile's name, or the path of a profile file (read by parse_settings)."""
    if is_profile_path(text):
        return text
    if text not in PROFILES:
        raise argparse.ArgumentTypeError(f"unknown profile {text!r}: use one of {', '.join(sorted(PROFILES))} "
                                         "or the path of a profile file (.json)")
    return text


def _fraction(text: str) -> float:
    return checked_argument(text, float, "a number", lambda v: 0 <= v <= 1, "must be from 0 to 1, got {text}")


def _port(text: str) -> int:
    return checked_argument(text, int, "a port", lambda v: 0 <= v <= 65535, "port out of range: {text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pytest_kvcache.emulator",
        description="An emulated vLLM + LMCache OpenAI-compatible server.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default %(default)s)")
    p.add_argument("--model", default="emulated-model", help="served model name")
    p.add_argument("--backend", choices=TIERS, default="none",
                   help="offload tier (waterfall: cpu over disk, --cpu-size-gb of RAM demoting LRU "
                        "chunks to --disk-size-gb under --disk-path)")
    p.add_argument("--profile", type=_profile_spec, default="quick", metavar="NAME|FILE.json",
                   help="timing profile, or a profile file written by 'python -m pytest_kvcache calibrate': "
                        + "; ".join(
                       f"{n}: {PROFILES[n].description or n} ({PROFILES[n].kv_bytes_per_token} KV B/token, "
                       f"{PROFILES[n].scheduler} scheduler)" for n in sorted(PROFILES)))
    p.add_argument("--slowdown", type=positive_float, default=1.0,
                   help="multiplies every modeled time (fixed profile included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per cache chunk")
    p.add_argument("--disk-path", default=None, help="directory of the disk/gds tier (waterfall: its disk)")
    p.add_argument("--cpu-size-gb", type=positive_float, default=128.0,
                   help="cpu tier size in GB of the real model's KV")
    p.add_argument("--disk-size-gb", type=positive_float, default=512.0,
                   help="disk/gds tier size in GB of the real model's KV")
    p.add_argument("--payload-scale", type=positive_float, default=1 / 4096,
                   help="bytes stored per real-model KV byte (default 1/4096)")
    p.add_argument("--fixed-ttft-ms", type=nonneg_float, default=None,
                   help="fixed profile: time to first token (default 40)")
    p.add_argument("--fixed-itl-ms", type=nonneg_float, default=None,
                   help="fixed profile: interval between tokens (default 8)")
    p.add_argument("--redis-url", default=None,
                   help="redis tier: the Redis server, redis://HOST:PORT[/DB] (real GET/SET)")
    p.add_argument("--redis-size-gb", type=positive_float, default=512.0,
                   help="redis tier size in GB of the real model's KV")
    k = p.add_argument_group(
        "knobs for testing the plugin: faults and slowdowns (seeded by --seed, deterministic; each is also a "
        "--config-json key, its name with _ for -, e.g. {\"error_rate\": 0.1, \"crash_after\": 50})")
    k.add_argument("--error-rate", type=_fraction, default=None, metavar="F",
                   help="fraction in [0, 1] of requests answered 500 (vLLM's error shape)")
    k.add_argument("--corrupt-rate", type=_fraction, default=None, metavar="F",
                   help="fraction in [0, 1] of offloaded chunks (a seeded draw per chunk) stored with altered "
                        "bytes under a valid CRC (an offload bug no frame check catches): warm answers that load "
                        "them differ from the cold ones; counted in emulator:corrupted_chunks_total")
    k.add_argument("--crash-after", type=positive_int, default=None, metavar="N",
                   help="the process exits with status 3 when request N+1 arrives (a server dying mid-run)")
    k.add_argument("--stall-ms", type=nonneg_float, default=None, metavar="MS",
                   help="with --stall-every N: every N-th request's first token comes MS milliseconds late")
    k.add_argument("--stall-every", type=positive_int, default=None, metavar="N",
                   help="which requests --stall-ms delays: every N-th")
    k.add_argument("--offload-disabled", action="store_true", default=None,
                   help="the tier stores nothing and never hits (a misconfigured LMCache silently "
                        "recomputing); lookups are still counted in /metrics and the logs")
    k.add_argument("--jitter", type=nonneg_float, default=None,
                   help="fraction in [0, 1): each modeled time is multiplied by a seeded uniform "
                        "factor in [1-j, 1+j] (modeled profiles)")
    k.add_argument("--slowdown-prefill", type=positive_float, default=None,
                   help="multiplies modeled prefill compute (fixed profile: the TTFT), on top of --slowdown")
    k.add_argument("--slowdown-decode", type=positive_float, default=None,
                   help="multiplies decode intervals (fixed profile: the ITL), on top of --slowdown")
    k.add_argument("--slowdown-load", type=positive_float, default=None,
                   help="multiplies modeled load/store transfer of the offload tier, on top of --slowdown")
    p.add_argument("--max-model-len", type=positive_int, default=131072)
    p.add_argument("--served-version", default=None, metavar="VERSION",
                   help=f"the version GET /version reports (default: this package's, {__version__})")
    p.add_argument("--config-json", default=None,
                   help="JSON object overriding profile fields (e.g. prefill_base_ms, "
                        "bandwidth_gbps) and emulator settings (use_odirect, spin_ms, "
                        "vocab_size, error_rate, corrupt_rate, crash_after, stall_ms, stall_every, "
                        "default_max_tokens, send_headers_early, offload_disabled, jitter, "
                        "slowdown_prefill, slowdown_decode, slowdown_load, redis_url, read_delay_ms; profile fields "
                        "scheduler, max_num_seqs, max_num_batched_tokens, step_base_ms)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    add_limit_options(p, header_note=f"; aiohttp refuses with 400 a line over {AIOHTTP_MAX_LINE} bytes or more "
                                     f"than {AIOHTTP_MAX_HEADERS} headers")
    return p


#: flags that are also --config-json keys: given, they win over the JSON's value
_FLAG_EXTRAS = ("offload_disabled", "jitter", "slowdown_prefill", "slowdown_decode", "slowdown_load", "redis_url",
                "served_version", "error_rate", "corrupt_rate", "crash_after", "stall_ms", "stall_every")


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """Parse ``argv`` into a :class:`~.settings.Settings` (argparse errors exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides, extras = _config_json(parser, args.config_json)
    if args.fixed_ttft_ms is not None:
        overrides["fixed_ttft_ms"] = args.fixed_ttft_ms
    if args.fixed_itl_ms is not None:
        overrides["fixed_itl_ms"] = args.fixed_itl_ms
    try:
        profile = resolve_profile(args.profile, overrides)
    except ProfileFileError as exc:
        parser.error(f"--profile: {exc}")
    except (ValueError, TypeError) as exc:
        parser.error(f"--config-json: {exc}")
    for name in _FLAG_EXTRAS:
        value = getattr(args, name)
        if value is not None:
            extras[name] = value
    _check_backend(parser, args.backend, args.disk_path, extras.get("redis_url"))
    _check_extras(parser, extras)
    return Settings(
        host=args.host, port=args.port, model=args.model, backend=args.backend,
        profile=profile, slowdown=args.slowdown, seed=args.seed, chunk_size=args.chunk_size,
        disk_path=args.disk_path, cpu_size_gb=args.cpu_size_gb, disk_size_gb=args.disk_size_gb,
        payload_scale=args.payload_scale, max_model_len=args.max_model_len,
        redis_size_gb=args.redis_size_gb, limits=RequestLimits.from_args(args), **extras,
    ), args


def _config_json(parser: argparse.ArgumentParser, text: str | None) -> tuple[dict, dict]:
    """``--config-json`` as (profile field overrides, emulator settings)."""
    overrides: dict = {}
    extras: dict = {}
    if not text:
        return overrides, extras
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        parser.error(f"--config-json is not valid JSON: {exc}")
    if not isinstance(cfg, dict):
        parser.error("--config-json must be a JSON object")
    for k, v in cfg.items():
        if k in EMULATOR_KEYS:
            try:
                extras[k] = EMULATOR_KEYS[k](v)
            except (TypeError, ValueError):
                parser.error(f"--config-json: bad value for {k!r}: {v!r}")
        else:
            overrides[k] = v
    return overrides, extras


def _check_backend(parser: argparse.ArgumentParser, backend: str, disk_path: str | None,
                   redis_url: str | None) -> None:
    """The tier's own settings: a disk path, a Redis URL that parses."""
    if backend in ("disk", "gds", "waterfall") and not disk_path:
        parser.error(f"--backend {backend} requires --disk-path")
    if backend == "redis" and not redis_url:
        parser.error("--backend redis requires --redis-url")
    if redis_url:
        if "{" in redis_url:
            parser.error(f"--redis-url {redis_url!r} is an unrendered template "
                         "(the caller must start the Redis service and fill in its port)")
        from .._redis_url import parse_redis_url

        try:
            parse_redis_url(redis_url)
        except ValueError as exc:
            parser.error(f"--redis-url: {exc}")


def _check_extras(parser: argparse.ArgumentParser, extras: dict) -> None:
    """The knobs' ranges, whether a flag or --config-json gave them."""
    if bool(extras.get("stall_ms")) != bool(extras.get("stall_every")):
        parser.error("--stall-ms and --stall-every go together: every N-th request (--stall-every N) is late by "
                     "MS milliseconds (--stall-ms MS)")
    if not 0.0 <= extras.get("jitter", 0.0) < 1.0:
        parser.error("--jitter must be in [0, 1)")
    if not 0.0 <= extras.get("corrupt_rate", 0.0) <= 1.0:
        parser.error("--corrupt-rate must be in [0, 1]")
    for name in ("slowdown_prefill", "slowdown_decode", "slowdown_load"):
        if not extras.get(name, 1.0) > 0:
            parser.error(f"{name} must be > 0")
    if extras.get("read_delay_ms", 0.0) < 0:
        parser.error("--config-json: read_delay_ms must be >= 0")
    if extras.get("vocab_size", 32000) <= 16:
        parser.error("--config-json: vocab_size too small")


def _setup_logging(level: str) -> None:
    lvl = getattr(logging, level.upper())
    root = logging.getLogger("pytest_kvcache.emulator")
    root.setLevel(lvl)
    root.propagate = False
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [emulator] %(message)s",
                                     "%m-%d %H:%M:%S"))
    root.addHandler(h)
    lm = logging.getLogger("pytest_kvcache.emulator.lmcache")
    lm.propagate = False
    lm.setLevel(lvl)
    h2 = logging.StreamHandler(sys.stderr)
    h2.setFormatter(logging.Formatter("[%(asctime)s] LMCache %(levelname)s: %(message)s"))
    lm.addHandler(h2)
    aio = logging.getLogger("aiohttp.server")
    aio.propagate = False
    aio.addFilter(_client_error_line)
    aio.addHandler(h)


def _client_error_line(record: logging.LogRecord) -> bool:
    """aiohttp logs a request its parser refused with the parser's traceback: the fault is the
    client's, so it becomes one warning line (a handler's own failure keeps its traceback)."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg = f"{record.getMessage()}: {exc.code}, {' '.join(str(exc.message).split())}"
        record.args = ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


async def _serve(settings: Settings) -> None:
    from aiohttp import web

    from .app import create_app

    log = logging.getLogger("pytest_kvcache.emulator")
    app = create_app(settings)
    line = min(settings.limits.max_header_bytes, AIOHTTP_MAX_LINE)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, max_line_size=line, max_field_size=line,
                           max_headers=AIOHTTP_MAX_HEADERS)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    p = settings.profile
    log.info("serving %s on http://%s:%d (backend=%s, profile=%s, slowdown=%g, chunk_size=%d)",
             settings.model, settings.host, settings.port, settings.backend, p.name,
             settings.slowdown, settings.chunk_size)
    log.info("Application startup complete.")
    # A full collection walks every object made at import (aiohttp, the vocabulary):
    # ~10 ms, long enough to spoil a first-token deadline.  Freeze them once.
    gc.collect()
    gc.freeze()
    # The offload writer thread must not take the interpreter lock from the event loop:
    # with the default 5 ms switch interval it forced the loop to hand the lock over
    # after nearly every one of its system calls while requests were parsed, and on a
    # busy 2-core machine each handover could cost milliseconds of a token's deadline.
    # The writer still runs whenever the loop waits (between requests, in epoll).
    sys.setswitchinterval(WRITER_SWITCH_INTERVAL_S)
    await stop.wait()
    n = app["emulator"].abort_requests()
    log.info("shutting down (%d requests aborted)", n)
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    settings, args = parse_settings(argv)
    _setup_logging(args.log_level)
    try:
        asyncio.run(_serve(settings))
    except OSError as exc:
        logging.getLogger("pytest_kvcache.emulator").error("cannot serve: %s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
