"""``--kv-server external`` as the README shows it: a server somebody else runs has one
configuration, so only its backend's items run; a tier that is not there fails after
the first trial with a message about that server, not about flags the plugin never set."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvcache.servers._process import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emulator(tmp_path) -> Iterator:
    """Start an emulator with these arguments; its URL."""
    started = []

    def start(*args: str) -> str:
        port = free_port()
        process = ManagedProcess("emulator", [sys.executable, "-m", "pytest_kvcache.emulator", "--port", str(port),
                                              "--log-level", "warning", *args],
                                 log_path=tmp_path / f"emulator-{port}.log",
                                 health_url=f"http://127.0.0.1:{port}/health")
        process.start()
        started.append(process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """The repository's default scenarios and committed baselines (recorded on the emulator)."""
    shutil.copytree(ROOT / "scenarios", pytester.path / "scenarios")
    shutil.copytree(ROOT / "baselines", pytester.path / "baselines")
    return pytester


def _text(result: pytest.RunResult) -> str:
    """The output with its lines joined: a line wrapped to the terminal's width reads whole."""
    return " ".join(result.stdout.str().split())


def run(project: pytest.Pytester, url: str, *args: str) -> pytest.RunResult:
    # the README's command, kept to the 1k items so that a test takes seconds
    return project.runpytest_subprocess("-p", "no:cacheprovider", "--kv-server", "external", "--kv-endpoint", url,
                                        "--input-len", "1k", "-rs", *args, timeout=300)


def test_the_readme_example_against_an_emulator_with_a_tier(project, emulator):
    url = emulator("--backend", "cpu")
    result = run(project, url)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    text = _text(result)
    assert (f"kvcache: the external server at {url} runs backend 'cpu' (its GET /version): deselected 15 item(s) "
            "of other backends (none, disk, gds) and 1 paired item(s), which need two server configurations") in text
    # measured, then skipped: the committed baselines were recorded on the emulator, another testbed
    result.assert_outcomes(skipped=1)
    assert "prefill[cpu-1k-c16].json was recorded on another testbed" in text


def test_a_server_without_a_tier_after_saying_which_backend_it_is(project, emulator):
    url = emulator("--backend", "none")
    result = run(project, url, "--kv-external-backend", "none")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert f"kvcache: the external server at {url} runs backend 'none' (--kv-external-backend): deselected" \
        in _text(result)
    result.assert_outcomes(skipped=1)


def test_a_missing_tier_fails_after_the_first_trial_naming_the_server(project, emulator):
    url = emulator("--backend", "cpu", "--offload-disabled")  # says cpu, stores nothing
    result = run(project, url)
    result.assert_outcomes(failed=1)
    text = _text(result)
    assert f"the external server at {url} runs no working 'cpu' tier" in text
    assert "--kv-external-backend NAME" in text and "(2 more trial(s) not run" in text
    assert "server log: None" not in text and "check --kv-transfer-config" not in text
    assert "trial 2" not in text  # it stopped after the first


def test_the_named_backend_must_match_what_the_server_says(project, emulator):
    url = emulator("--backend", "none")
    result = run(project, url, "--kv-external-backend", "cpu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--kv-external-backend / kvcache_external_backend = 'cpu', but the server at {url} "
                                 "says it runs backend 'none'*"])


def test_a_server_that_does_not_say_runs_every_item_and_says_how_to_choose(pytester):
    pytester.mkdir("scenarios")
    shutil.copy(ROOT / "scenarios" / "seed_prefill.yaml", pytester.path / "scenarios")
    result = pytester.runpytest("--collect-only", "-q", "--kv-server", "external", "--kv-endpoint",
                                "http://127.0.0.1:9")  # nothing listens: /version says nothing
    assert result.ret == 0
    text = _text(result)
    assert "does not say which offload backend it runs (GET /version failed" in text
    assert "every backend's items run against it; pass --kv-external-backend NAME" in text
    assert len([line for line in result.outlines if "::prefill[" in line]) == 20
    named = pytester.runpytest("--collect-only", "-q", "--kv-server", "external", "--kv-endpoint",
                               "http://127.0.0.1:9", "--kv-external-backend", "gds")
    assert named.ret == 0
    assert len([line for line in named.outlines if "::prefill[" in line]) == 5


@pytest.mark.parametrize("args,ini,message", [
    (["--kv-external-backend", "floppy"], "",
     "--kv-external-backend / kvcache_external_backend = 'floppy': use one of"),
    ([], "kvcache_external_backend = tape\n", "kvcache_external_backend = 'tape': use one of"),
    (["--kv-server", "emulator", "--kv-external-backend", "cpu"], "",
     "--kv-external-backend cpu names the backend of a server somebody else runs"),
])
def test_bad_external_backend_is_a_usage_error(pytester, args, ini, message):
    pytester.mkdir("scenarios")
    shutil.copy(ROOT / "scenarios" / "seed_prefill.yaml", pytester.path / "scenarios")
    if ini:
        pytester.makeini(f"[pytest]\nkvcache_server = external\nkvcache_endpoint = http://127.0.0.1:9\n{ini}")
    elif "--kv-server" not in args:
        args = ["--kv-server", "external", "--kv-endpoint", "http://127.0.0.1:9", *args]
    result = pytester.runpytest("--collect-only", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_external_backend_ini_and_help(pytester):
    pytester.mkdir("scenarios")
    shutil.copy(ROOT / "scenarios" / "seed_prefill.yaml", pytester.path / "scenarios")
    pytester.makeini("[pytest]\nkvcache_server = external\nkvcache_endpoint = http://127.0.0.1:9\n"
                     "kvcache_external_backend = disk\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == 0
    assert len([line for line in result.outlines if "::prefill[disk-" in line]) == 5
    assert not [line for line in result.outlines if "::prefill[none-" in line]
    help_text = pytester.runpytest("--help").stdout.str()
    assert "--kv-external-backend=NAME" in help_text and "kvcache_external_backend" in help_text
