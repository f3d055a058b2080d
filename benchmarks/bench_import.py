"""Import cost of the plugin: what pytest-kvcache adds to every pytest run of an environment
where it is installed.

    python benchmarks/bench_import.py            # about ten seconds
    python benchmarks/bench_import.py --runs 21  # steadier on a busy machine

pytest imports ``pytest_kvcache.plugin`` (the pytest11 entry point) in every run, whatever
the tests are, and then the modules its ``pytest_plugins`` registers (fixtures, collection).
Each figure is the median, over fresh interpreters, of ``-X importtime``'s cumulative
milliseconds: ``import pytest`` alone, then what the plugin (and the modules it registers)
import beyond what pytest already did. The plugin's share is compared with the 30 ms target
(docs/architecture.md: heavy libraries are imported where they are used).

Import is not the whole cost: ``pytest_configure`` reads the settings and sets up the
session, which imports the engine. The last figure is that whole cost, measured as a
pytest run of a one-test project without scenario files against the same run with
``-p no:kvcache``, run in turn (median of the paired differences).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_MS = 30.0
ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "pytest": "import pytest",
    "plugin": "import pytest, pytest_kvcache.plugin",
    "registered": "import pytest, pytest_kvcache.plugin, pytest_kvcache.fixtures, pytest_kvcache.collection",
}


def top_level_ms(code: str, pycache: Path) -> dict[str, float]:
    """The milliseconds of each top-level import ``code`` makes in a fresh interpreter
    (cumulative: with everything it imports that nothing before it had). Bytecode is kept
    in ``pycache``, as an installed package keeps it, so that no run compiles."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run([sys.executable, "-X", f"pycache_prefix={pycache}", "-X", "importtime", "-c", code],
                          capture_output=True, text=True, env=env, check=True)
    found = {}
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"; top-level names are not indented
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit() and not name[1:].startswith(" "):
            found[name.strip()] = int(cumulative) / 1000.0
    return found


def pytest_run_ms(project: Path, pycache: Path, *extra: str) -> float:
    """Wall milliseconds of a quiet pytest run of ``project`` in a fresh interpreter, its
    bytecode kept in ``pycache``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-X", f"pycache_prefix={pycache}", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    *extra], cwd=project, capture_output=True, env=env, check=True)
    return (time.perf_counter() - started) * 1000.0


def configure_cost_ms(runs: int, pycache: Path) -> float:
    """Median over ``runs`` pairs of (run with the plugin) - (run with -p no:kvcache)."""
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        (project / "test_one.py").write_text("def test_one():\n    pass\n")
        pytest_run_ms(project, pycache)  # writes the bytecode, warms the file cache
        return statistics.median(pytest_run_ms(project, pycache) - pytest_run_ms(project, pycache, "-p", "no:kvcache")
                                 for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="fresh interpreters per command (default 9)")
    runs = parser.parse_args().runs
    pytest_ms: list[float] = []
    beyond: dict[str, list[float]] = {label: [] for label in COMMANDS if label != "pytest"}
    with tempfile.TemporaryDirectory() as pycache:
        top_level_ms(COMMANDS["registered"], Path(pycache))  # writes the bytecode
        whole_run = configure_cost_ms(runs, Path(pycache))
        for _ in range(runs):
            alone = top_level_ms(COMMANDS["pytest"], Path(pycache))
            pytest_ms.append(alone["pytest"])
            for label, figures in beyond.items():
                # what pytest alone did not import: the plugin's modules and what only they need
                figures.append(sum(ms for name, ms in top_level_ms(COMMANDS[label], Path(pycache)).items()
                                   if name not in alone))
    print(f"median of {runs} fresh interpreters, -X importtime, cumulative ms (bytecode compiled once before)")
    print(f"{'import pytest':<96}{statistics.median(pytest_ms):>8.1f}")
    for label, figures in beyond.items():
        print(f"{'  beyond it: ' + COMMANDS[label].removeprefix('import pytest, '):<96}"
              f"{statistics.median(figures):>8.1f}")
    plugin = statistics.median(beyond["plugin"])
    verdict = "under" if plugin < TARGET_MS else "OVER"
    print(f"importing pytest_kvcache.plugin adds {plugin:.1f} ms to every pytest run: {verdict} the "
          f"{TARGET_MS:g} ms target")
    print(f"a whole pytest run of a project without scenarios (import, then the settings read at configure; "
          f"no session without a benchmark item): +{whole_run:.0f} ms against -p no:kvcache")


if __name__ == "__main__":
    main()
