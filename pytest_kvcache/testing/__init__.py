"""Test tools, as pytest's ``pytester``: the reference server and a fixture that starts it.

The reference server (:mod:`pytest_kvcache.testing.reference_server`) answers the OpenAI
API with fixed, known timings and reports when it sent each chunk, so that a test or a
benchmark can measure a client's own error, or drive the plugin against a server whose
TTFT it chooses. Enable the fixture with::

    pytest_plugins = ("pytest_kvcache.testing",)

    def test_client(kv_reference_server):
        server = kv_reference_server("--ttft-ms", "40", "--itl-ms", "8")
        ...  # server.url, server.port, server.model
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..servers._process import ManagedProcess, free_port

__all__ = ["ReferenceServer", "kv_reference_server", "start_reference_server"]

#: the model name the reference server serves unless told another
REFERENCE_MODEL = "ref-test-model"


@dataclass
class ReferenceServer:
    """A running reference server."""

    url: str
    port: int
    model: str
    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


def start_reference_server(log_dir: Path, *args: str, model: str = REFERENCE_MODEL,
                           name: str = "reference server", ready_timeout: float = 30.0) -> ReferenceServer:
    """``python -m pytest_kvcache.testing.reference_server`` on a free loopback port, ready
    (its /health answers); ``args`` are its options (``--ttft-ms 40 --itl-ms 8``, ...)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # the server runs this very package, wherever it was imported from (a checkout, an install)
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH")))))
    process = ManagedProcess(
        name, [sys.executable, "-m", "pytest_kvcache.testing.reference_server", "--host", "127.0.0.1",
               "--port", str(port), "--model", model, *args],
        log_path=Path(log_dir) / f"reference-server-{port}.log", health_url=f"{url}/health", env=env,
        ready_timeout=ready_timeout)
    process.start()
    return ReferenceServer(url=url, port=port, model=model, process=process)


@pytest.fixture
def kv_reference_server(tmp_path: Path) -> Iterator[Callable[..., ReferenceServer]]:
    """A function starting reference servers (see :func:`start_reference_server`); each is
    stopped when the test ends."""
    started: list[ReferenceServer] = []

    def start(*args: str, model: str = REFERENCE_MODEL, name: str = "reference server") -> ReferenceServer:
        started.append(start_reference_server(tmp_path, *args, model=model, name=name))
        return started[-1]

    yield start
    for server in started:
        server.stop()
