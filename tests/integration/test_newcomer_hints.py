"""What a newcomer types first reads right: an empty selection says what exists, the
markers are listed, a scenario setting without effect is refused, help texts are whole."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    return pytester


def _text(result: pytest.RunResult) -> str:
    return " ".join(result.stdout.str().split())


def test_a_marker_that_matches_nothing_says_which_markers_exist(project):
    result = project.runpytest("-m", "gsd")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    text = _text(result)
    assert "pytest-kvcache: no item selected of the 23 benchmark item(s) collected" in text
    assert "markers (-m): kvcache; backends none, cpu, disk, gds; phases prefill, multiturn, shared_prefix" in text
    assert "-m gsd: no item has the marker 'gsd'; did you mean gds?" in text


def test_a_length_that_matches_nothing_says_which_lengths_exist(project):
    result = project.runpytest("--input-len", "2k", "--concurrency", "16,32")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    text = _text(result)
    assert "--input-len: 100, 128, 1k, 4k, 10k, 50k, 100k" in text
    assert "--input-len 2k: no item has this value" in text
    assert "--concurrency 32: no item has this value" in text and "--concurrency: 8, 16" in text


def test_backend_and_phase_markers_are_listed(project):
    result = project.runpytest("--markers")
    assert result.ret == 0
    for marker in ("cpu", "gds", "prefill", "multiturn", "shared_prefix"):
        result.stdout.fnmatch_lines([f"@pytest.mark.{marker}: items of the*"])


def _help(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def test_emulator_help_shows_defaults_and_every_fault_knob():
    text = _help("pytest_kvcache.emulator")
    assert "--host HOST address to listen on (default 127.0.0.1)" in text
    assert "--port PORT port to listen on (default 8000)" in text
    for flag in ("--error-rate F", "--crash-after N", "--stall-ms MS", "--stall-every N", "--jitter",
                 "--offload-disabled", "--slowdown-load"):
        assert flag in text, flag


def test_calibrate_help_describes_the_seed():
    assert "--seed SEED seed of the prompts' random token ids" in _help("pytest_kvcache", "calibrate")
