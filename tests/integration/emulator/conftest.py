"""The emulator tests' shared fixture: emulator processes, stopped at the module's end."""

from __future__ import annotations

import pytest
from helpers.emulator import Emu


@pytest.fixture(scope="module")
def emu_factory(tmp_path_factory):
    started: list[Emu] = []
    tmp = tmp_path_factory.mktemp("emu")

    def start(*args: str) -> Emu:
        e = Emu(tmp, *args)
        started.append(e)
        return e

    yield start
    for e in started:
        e.stop()
