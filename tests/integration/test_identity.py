"""pytest_kvcache.identity in a plugin run: what a run is compared on, and what across."""

from __future__ import annotations

import os
import stat

from pytest_kvcache import identity


def test_host_facts_read_nvidia_smi_and_proc(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\nif [ "$1" = "--query-gpu=name,driver_version" ]; then\n'
                    '  echo "NVIDIA H200, 570.86.15"; echo "NVIDIA H200, 570.86.15"\n'
                    'else echo "| NVIDIA-SMI 570.86.15  Driver Version: 570.86.15  CUDA Version: 12.8 |"; fi\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    facts = identity.host_facts()
    assert facts["gpu"] == "2 x NVIDIA H200" and facts["driver_version"] == "570.86.15"
    assert facts["cuda_version"] == "12.8" and int(facts["cpus"]) >= 1 and int(facts["memory_gib"]) >= 1
