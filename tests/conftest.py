import pytest


@pytest.fixture(autouse=True)
def _output_as_on_a_laptop(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest prints whole failure reasons in its short summary when CI or BUILD_NUMBER is set.

    Tests that count a reason in a pytester run's output expect the laptop's output, where the
    short summary cuts the line at COLUMNS.
    """
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
