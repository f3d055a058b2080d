"""The storage phase's gds tier: where it cannot run (no folder, no GPU, no kvikio) opening it
raises TierUnavailable naming what is missing and the fix, and the storage item skips with
that message; where it runs, blocks go between a GPU buffer and a file through kvikio, and a
tier whose I/O kvikio does through host memory (compat mode) says so in its description."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import re
import sys
import types
from pathlib import Path

import pytest

from pytest_kvcache.errors import KVCacheError
from pytest_kvcache.storage import StorageConfig, TierSpec, TierUnavailable, TraceSpec, open_tier, run_storage

BLOCK = 3 * 4096 + 100  # not a multiple of the alignment
NO_FOLDER = "no folder on a GDS mount given (set --kv-gds-path DIR or gds_path: DIR in the scenario file)"


def _gpu_here() -> bool:
    for module, seen in (("cupy", lambda m: m.cuda.runtime.getDeviceCount() > 0),
                         ("torch", lambda m: m.cuda.is_available())):
        try:
            if seen(__import__(module)):
                return True
        except (ImportError, RuntimeError):
            pass
    return False


KVIKIO_HERE = importlib.util.find_spec("kvikio") is not None


def test_without_a_folder_the_tier_is_unavailable_and_says_how_to_give_one(tmp_path):
    with pytest.raises(TierUnavailable) as raised:
        open_tier(TierSpec("gds", 8 * BLOCK), BLOCK, tmp_path)
    assert str(raised.value).startswith(f"tier gds cannot open: {NO_FOLDER}")
    assert isinstance(raised.value, OSError) and isinstance(raised.value, KVCacheError)
    assert not list(tmp_path.iterdir())


def test_a_folder_that_is_not_there_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    for folder in (tmp_path / "absent", tmp_path / "file"):
        with pytest.raises(TierUnavailable, match=f"the GDS folder {folder} does not exist or is not a folder "
                                                  r"\(create it on the GDS mount, or set --kv-gds-path DIR"):
            open_tier(TierSpec("gds", 8 * BLOCK), BLOCK, tmp_path, gds_path=str(folder))


@pytest.mark.skipif(KVIKIO_HERE or _gpu_here(), reason="this machine has kvikio or a GPU")
def test_here_the_message_names_the_gpu_and_kvikio_and_nothing_else(tmp_path):
    with pytest.raises(TierUnavailable) as raised:
        open_tier(TierSpec("gds", 8 * BLOCK), BLOCK, tmp_path, gds_path=tmp_path)
    assert str(raised.value) == ("tier gds cannot open: no GPU: neither cupy nor torch sees a CUDA device; "
                                 "kvikio is not installed (pip install kvikio-cu12)")


@pytest.mark.skipif(KVIKIO_HERE and _gpu_here(), reason="the gds tier can open here")
def test_a_replay_with_a_gds_tier_raises_it_as_it_is_and_leaves_nothing_behind(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    trace = TraceSpec(conversations=2, turns=1, block_tokens=4)
    config = StorageConfig("s[disk+gds]", (TierSpec("disk", 2**20), TierSpec("gds", 2**20)), trace=trace,
                           token_bytes=4096, trials=1, scratch_dir=str(scratch))
    with pytest.raises(TierUnavailable, match=f"^tier gds cannot open: {re.escape(NO_FOLDER)}"):  # the item skips
        run_storage(config)
    assert not list(scratch.iterdir())  # the disk tier's file and the trial's folder are gone


# -- the GPU path, with kvikio and cupy stood in for by host memory and a file ----------------------------------


class _DeviceArray:
    """What the tier does with a cupy array (slice, set from host, get to host), in host memory."""

    def __init__(self, array) -> None:
        self.array = array

    def __getitem__(self, index) -> _DeviceArray:
        return _DeviceArray(self.array[index])

    def set(self, host) -> None:
        self.array[...] = host

    def get(self):
        return self.array.copy()


def _fakes(np, preferred: bool, refuse: bool) -> tuple[types.SimpleNamespace, types.SimpleNamespace, dict]:
    state: dict = {"mode": "AUTO", "synced": 0}

    @contextlib.contextmanager
    def set_mode(key: str, value: str):
        assert key == "compat_mode"
        old, state["mode"] = state["mode"], value
        try:
            yield
        finally:  # kvikio's ConfigContextManager restores on any exit
            state["mode"] = old

    class CuFile:
        def __init__(self, path: Path, flags: str) -> None:
            if refuse and state["mode"] == "OFF":
                raise RuntimeError("cuFileHandleRegister failed")
            assert flags == "r+"
            self.fd = os.open(path, os.O_RDWR)

        def raw_write(self, buf: _DeviceArray, size: int, file_offset: int) -> int:
            return os.pwrite(self.fd, buf.array[:size].tobytes(), file_offset)

        def raw_read(self, buf: _DeviceArray, size: int, file_offset: int) -> int:
            data = os.pread(self.fd, size, file_offset)
            buf.array[:len(data)] = np.frombuffer(data, np.uint8)
            return len(data)

        def close(self) -> None:
            os.close(self.fd)

    def synchronize() -> None:
        state["synced"] += 1

    kvikio = types.SimpleNamespace(
        CuFile=CuFile, CompatMode=types.SimpleNamespace(ON="ON", OFF="OFF"), __version__="25.04.00",
        defaults=types.SimpleNamespace(is_compat_mode_preferred=lambda: preferred, set=set_mode))
    cupy = types.SimpleNamespace(
        uint8=np.uint8, empty=lambda n, dtype: _DeviceArray(np.zeros(n, dtype)),
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                   get_current_stream=lambda: types.SimpleNamespace(synchronize=synchronize)))
    return kvikio, cupy, state


@pytest.mark.parametrize(("preferred", "refuse", "mode"), [
    (False, False, "(GPUDirect Storage through kvikio's cuFile)"),
    (True, False, "(kvikio compat mode: POSIX through host memory, not GPUDirect: KVIKIO_COMPAT_MODE=ON, "
                  "or no usable libcufile under AUTO)"),
    (False, True, "(kvikio compat mode: POSIX through host memory, not GPUDirect: cuFile refused the file: "
                  "cuFileHandleRegister failed)"),
])
def test_blocks_round_trip_through_a_gpu_buffer_and_the_description_says_how(tmp_path, monkeypatch, preferred,
                                                                              refuse, mode):
    np = pytest.importorskip("numpy")
    kvikio, cupy, state = _fakes(np, preferred, refuse)
    monkeypatch.setitem(sys.modules, "kvikio", kvikio)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", kvikio.defaults)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    tier = open_tier(TierSpec("gds", 16 * BLOCK), BLOCK, tmp_path, gds_path=tmp_path)
    assert tier.kind == "gds" and tier.slots == 12 and state["mode"] == "AUTO"  # 16 KiB slots; the mode restored
    assert tier.description.startswith(f"file {tier.path} on ") and tier.description.endswith(mode)
    assert tier.path.parent == tmp_path and tier.path.stat().st_size == 12 * 16384
    payloads = {f"k{i}": random.Random(i).randbytes(BLOCK) for i in range(12)}
    for key, data in payloads.items():
        tier.write(key, data)
    assert all(tier.read(k) == v for k, v in reversed(payloads.items())) and state["synced"] == 12
    tier.delete("k0")
    tier.write("k12", b"\x01" * BLOCK)  # reuses the freed slot
    assert tier.read("k12") == b"\x01" * BLOCK and tier.read("k1") == payloads["k1"]
    with pytest.raises(ValueError, match=f"blocks are {BLOCK} bytes, got 3"):
        tier.write("k13", b"abc")
    tier.close()
    assert not tier.path.exists()
