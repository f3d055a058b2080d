import pytest

#: The client guard's floor for the projects these tests run. They test what the plugin does
#: with a round, on the emulator's millisecond requests, where a client on a shared runner
#: with a busy core hands a slot over late enough to deliver 6.6 of 8 in flight; the guard at
#: its default floor is tested in test_client_floor.py and test_loadgen.py.
TEST_PROJECT_CLIENT_FLOOR = "--kv-client-floor=0.5"


@pytest.fixture(autouse=True)
def _test_project_environment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """What every pytest run a test starts (pytester or a subprocess) sees.

    pytest prints whole failure reasons in its short summary when CI or BUILD_NUMBER is set;
    tests that count a reason in a run's output expect the laptop's output, where the short
    summary cuts the line at COLUMNS. pytester clears PYTEST_ADDOPTS when it is set up, so a
    test's pytester comes first.
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", TEST_PROJECT_CLIENT_FLOOR)
