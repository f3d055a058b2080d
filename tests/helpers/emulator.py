"""The emulator as a subprocess and the requests the emulator tests send it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
MODEL = "emu-test-model"


# -- helpers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emu:
    """One emulator subprocess; ``url`` once ready."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"emu-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "pytest_kvcache.emulator", "--host", "127.0.0.1",
               "--port", str(self.port), "--model", MODEL, *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator exited {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator not ready: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name: str, **labels: str) -> float:
        lab = ",".join([f'model_name="{MODEL}"'] + [f'{k}="{v}"' for k, v in labels.items()])
        return self.metrics()[f"{name}{{{lab}}}"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


async def raw_stream(port: int, path: str, body: dict, *, connected=None, go: asyncio.Event | None = None):
    """POST ``body`` over a raw connection; return (t_sent, [(t, event_json)]).

    Timestamps are taken by the client at send and on each HTTP chunk's arrival, with
    nothing in between but a socket read: the client-side view of the server's timing.
    """
    reader, writer = connected or await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data
    if go is not None:
        await go.wait()
    writer.write(req)
    t0 = time.perf_counter()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"chunked" in head.lower()
    events = []
    buf = b""
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        chunk = await reader.readexactly(size + 2)
        t = time.perf_counter()
        buf += chunk[:-2]
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            assert ev.startswith(b"data: "), ev
            ev = ev[6:]
            events.append((t, None if ev == b"[DONE]" else json.loads(ev)))
    writer.close()
    return t0, events


def stream(url: str, body: dict, chat: bool = False) -> list[dict | None]:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    out: list[dict | None] = []
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            out.append(None if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def timing_of(events: list[dict | None]) -> dict:
    last = [e for e in events if e is not None][-1]
    return last["emulator_timing"]


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true (state reached), failing after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, 32000) for _ in range(n)]


def ttft_of(url: str, ids: list[int]) -> dict:
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "stream": True}
    return timing_of(stream(url, body))
