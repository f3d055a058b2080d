"""The reference server (known timings): its options, without starting it."""

from __future__ import annotations

import pytest


def test_workers_need_a_fixed_port() -> None:
    from pytest_kvcache.testing.reference_server import main

    with pytest.raises(SystemExit) as exc:
        main(["--port", "0", "--workers", "2"])
    assert exc.value.code == 2
