"""A throwaway project with scenario files, and pytest run in it as a separate process:
what the report, compare and xdist tests share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def make_project(root: Path, scenario: str, name: str = "small.yaml") -> Path:
    (root / "scenarios").mkdir(parents=True, exist_ok=True)
    (root / "scenarios" / name).write_text(scenario)
    return root


def run_pytest(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          capture_output=True, text=True, timeout=timeout)
