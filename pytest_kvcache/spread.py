"""One round's load spread over several client processes.

One Python process reads about 85,000 streamed chunks a second on one core before its
guard trips (``benchmarks/bench_client.py``). A server on a bigger runner can stream
more than that; :class:`ClientProcesses` then sends each round from N processes, each
with its own event loop, connections and guard, and merges what they measured into
one :class:`~pytest_kvcache.models.RoundResult`, as if one client had sent it:

* the concurrency cap is split over the processes (slot ``s`` belongs to process
  ``s % N``) and so are the prompts (prompt ``k`` goes with slot ``k % cap``);
* with a request rate, the round's one seeded schedule is drawn here and each process
  sends its prompts at their own offsets of it, from one shared start time
  (``perf_counter`` is ``CLOCK_MONOTONIC``, one clock for every process);
* records keep their prompt's index; the round lasts from the shared start to the
  last byte of the last response; summaries are recomputed over all records; the guard
  figures are the worst process's (its lag, its delivered/configured ratios), with the
  totals of delivered concurrency and rate, and a round is invalid when any
  process's part is, naming the process.

The processes start on the first round (fresh interpreters, ``python -m
pytest_kvcache.spread``, talking over a socket pair) and serve every round until
:meth:`ClientProcesses.close`. One that dies raises :class:`ClientProcessError`
naming it and its exit code.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

from .errors import KVCacheError
from .loadgen import LoadSpec, _arrival_offsets, open_pool, run_round
from .metrics import summarize
from .models import RoundResult
from .workloads import Prompt

__all__ = ["ClientProcessError", "ClientProcesses", "split_slots"]

#: how long a new client process may take to import and report ready
READY_TIMEOUT_S = 120.0
#: the shared start is this far after the round is handed out (the messages, the
#: processes' wake-up), so that every process starts on time
START_MARGIN_S = 0.05


class ClientProcessError(KVCacheError):
    """A client process could not start, died, or failed outside any request."""


def split_slots(max_concurrency: int, processes: int) -> list[int]:
    """Each process's share of the concurrency cap (slot ``s`` belongs to process ``s % N``)."""
    n = min(processes, max_concurrency)
    return [len(range(i, max_concurrency, n)) for i in range(n)]


def _serve(conn, base_url: str, max_concurrency: int, kernel_stamps: bool) -> None:
    """A client process: one event loop and one connection pool for every round it is sent."""
    loop = asyncio.new_event_loop()
    pool = open_pool(base_url, max_concurrency, kernel_stamps=kernel_stamps)
    try:
        conn.send(("ready",))
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            if message[0] == "stop":
                return
            _, spec, prompts, round_name, offsets, start_at = message
            timings: dict = {}
            try:
                result = loop.run_until_complete(run_round(pool, spec, prompts, round_name, server_timings=timings,
                                                           arrival_offsets=offsets, start_at=start_at))
            except Exception:  # noqa: BLE001 - reported to the parent, which raises it
                conn.send(("error", traceback.format_exc()))
            else:
                conn.send(("result", result, timings))
    finally:
        pool.close()
        loop.close()


class ClientProcesses:
    """Sends rounds to one server from ``processes`` client processes (see the module)."""

    def __init__(self, base_url: str, max_concurrency: int, processes: int, *, kernel_stamps: bool = True) -> None:
        if processes < 1:
            raise ValueError(f"client processes must be 1 or more, not {processes}")
        self.base_url = base_url
        self.max_concurrency = max_concurrency
        self.shares = split_slots(max_concurrency, processes)
        self._kernel_stamps = kernel_stamps
        self._workers: list = []  # (process, connection)

    @property
    def processes(self) -> int:
        return len(self.shares)

    def _start(self) -> None:
        # a fresh interpreter per process (``python -m pytest_kvcache.spread``): nothing of
        # this one's state, nor its __main__, is carried over
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH")))))
        for share in self.shares:
            ours, theirs = socket.socketpair()
            process = subprocess.Popen(
                [sys.executable, "-m", "pytest_kvcache.spread", str(theirs.fileno()), self.base_url, str(share),
                 "kernel" if self._kernel_stamps else "user"],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
            theirs.close()
            self._workers.append((process, Connection(ours.detach())))
        for i, (process, conn) in enumerate(self._workers):
            if not conn.poll(READY_TIMEOUT_S):
                raise ClientProcessError(f"client process {i + 1} (pid {process.pid}) did not start within "
                                         f"{READY_TIMEOUT_S:g}s")
            self._receive(i)

    def _receive(self, i: int):
        process, conn = self._workers[i]
        try:
            message = conn.recv()
        except (EOFError, OSError):
            raise self._died(i) from None
        if message[0] == "error":
            raise ClientProcessError(f"client process {i + 1} failed:\n{message[1]}")
        return message

    def _died(self, i: int) -> ClientProcessError:
        process = self._workers[i][0]
        try:
            code = process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        return ClientProcessError(f"client process {i + 1} (pid {process.pid}) died, exit code {code} "
                                  "(its error is printed above)")

    async def run_round(self, spec: LoadSpec, prompts: Sequence[Prompt], round_name: str,
                        on_request_done: Callable[[], None] | None = None, *,
                        server_timings: dict | None = None) -> RoundResult:
        """Like :func:`loadgen.run_round`, the load spread over the processes."""
        if spec.max_concurrency != self.max_concurrency:
            raise ValueError(f"these client processes hold {self.max_concurrency} slots, the round asks for "
                             f"{spec.max_concurrency}")
        loop = asyncio.get_running_loop()
        try:
            if not self._workers:
                await loop.run_in_executor(None, self._start)
            return await self._spread(loop, spec, prompts, round_name, on_request_done, server_timings)
        except BaseException:
            self.close(abort=True)  # a round given up half-way must not leave its replies for the next one
            raise

    async def _spread(self, loop: asyncio.AbstractEventLoop, spec: LoadSpec, prompts: Sequence[Prompt],
                      round_name: str, on_request_done: Callable[[], None] | None,
                      server_timings: dict | None) -> RoundResult:
        n = self.processes
        owners = [(k % spec.max_concurrency) % n for k in range(len(prompts))]
        mine = [[k for k in range(len(prompts)) if owners[k] == i] for i in range(n)]
        offsets = _arrival_offsets(len(prompts), spec.request_rate, spec.seed, spec.burstiness)
        start_at = time.perf_counter() + START_MARGIN_S
        for i, (_, conn) in enumerate(self._workers):
            part_spec = replace(spec, max_concurrency=self.shares[i])
            try:
                conn.send(("round", part_spec, [prompts[k] for k in mine[i]], round_name,
                           [offsets[k] for k in mine[i]], start_at))
            except OSError:  # its end of the socket pair is gone
                raise self._died(i) from None
        replies = await asyncio.gather(*(loop.run_in_executor(None, self._receive, i) for i in range(n)))
        parts: list[RoundResult] = [reply[1] for reply in replies]
        records = sorted((replace(r, index=mine[i][r.index]) for i, part in enumerate(parts) for r in part.records),
                         key=lambda r: r.index)
        if server_timings is not None:
            for i, reply in enumerate(replies):
                server_timings.update({mine[i][local]: timing for local, timing in reply[2].items()})
        if on_request_done is not None:
            for _ in records:
                on_request_done()
        duration = max(part.duration for part in parts)  # every part's clock starts at start_at
        summary = summarize(records, duration)
        summary.update(_guard_figures(spec, parts))
        reasons = [f"client process {i + 1}: {part.invalid_reason}" for i, part in enumerate(parts)
                   if part.invalid_reason]
        return RoundResult(round=round_name, records=tuple(records), duration=duration, summary=summary,
                           max_loop_lag_ms=max(part.max_loop_lag_ms for part in parts),
                           invalid_reason="; ".join(reasons) or None, client_stamps=RoundResult.stamps_of(parts))

    def close(self, *, abort: bool = False) -> None:
        """Stop the processes: after their current round, or at once with ``abort``."""
        workers, self._workers = self._workers, []
        for process, conn in workers:
            try:
                if abort:
                    process.kill()
                else:
                    conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
        for process, conn in workers:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            conn.close()


def _guard_figures(spec: LoadSpec, parts: Sequence[RoundResult]) -> dict:
    """The client guard's figures of the whole round from its processes' parts: the
    worst lag, lateness and ratio, and the total delivered concurrency and rate."""

    def values(key: str) -> list[float]:
        return [v for p in parts if (v := p.summary.get(key)) is not None]

    def total(key: str) -> float | None:
        found = values(key)
        return sum(found) if len(found) == len(parts) else None

    guard: dict = {"client_processes": len(parts), "configured_concurrency": spec.max_concurrency,
                   "loop_lag_p99_ms": max(values("loop_lag_p99_ms"), default=0.0),
                   "delivered_concurrency": total("delivered_concurrency"),
                   "concurrency_ratio": min(values("concurrency_ratio"), default=None)}
    if values("configured_request_rate"):
        guard.update({
            "configured_request_rate": spec.request_rate,
            "p99_arrival_lateness_ms": max(values("p99_arrival_lateness_ms"), default=None),
            "scheduled_request_rate": total("scheduled_request_rate"),
            "delivered_request_rate": total("delivered_request_rate"),
            "request_rate_ratio": min(values("request_rate_ratio"), default=None),
        })
    return guard


def main(argv: Sequence[str]) -> int:
    """``python -m pytest_kvcache.spread FD BASE_URL CONCURRENCY kernel|user`` (started by ClientProcesses)."""
    fd, base_url, max_concurrency, stamps = argv
    _serve(Connection(int(fd)), base_url, int(max_concurrency), stamps == "kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
