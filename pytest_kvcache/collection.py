"""Collection: scenario files become items, and benchmark items are filtered and ordered.

Scenario files (``*.yaml`` in a folder named ``scenarios``, or any YAML file named on
the command line) become one :class:`ScenarioItem` per matrix point, named like
``prefill[cpu-10k-c16]`` and marked with their backend and phase. Tests written with
the fixtures of :mod:`.fixtures` are parametrized by their kvcache marker
(:func:`pytest_generate_tests`); both kinds are filtered by --input-len, --concurrency,
--backend and --output-len and grouped by server, the storage phase's items first
(:func:`pytest_collection_modifyitems`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ._stash import SETTINGS_KEY, STEMS_KEY
from .errors import KVCacheError

if TYPE_CHECKING:
    from .models import ScenarioCase
    from .session import KVSession

__all__ = ["ScenarioFile", "ScenarioItem"]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> ScenarioFile | None:
    if file_path.suffix not in (".yaml", ".yml"):
        return None
    explicit = {Path(arg.split("::")[0]).resolve() for arg in parent.config.args}
    if file_path.parent.name == "scenarios" or file_path.resolve() in explicit:
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _scenario_test(request: pytest.FixtureRequest, kvcache_session: KVSession) -> None:
    """The body of every scenario item: measure, store, compare (see KVSession.run_item)."""
    from .plugin import item_progress, record_item

    item = request.node
    try:
        kvcache_session.run_item(item.nodeid, item.case, item.baseline_key, item_progress(request, item.case.name))
    finally:
        record_item(request, kvcache_session)


def _stem_clash(config: pytest.Config, path: Path) -> str | None:
    """Items are keyed by file stem and item name (ScenarioItem.baseline_key, fixtures.baseline_key):
    two files of one stem in different folders would share baseline and result files. Refused
    rather than keyed by folder, so that a key never depends on which files a run collects."""
    stem = path.stem
    other = config.stash.setdefault(STEMS_KEY, {}).setdefault(stem.casefold(), path)
    if other == path:
        return None

    def shown(p: Path) -> str:
        try:
            return p.relative_to(config.rootpath).as_posix()
        except ValueError:
            return str(p)

    files = "scenario files" if {path.suffix, other.suffix} <= {".yaml", ".yml"} else "files"
    baselines = config.stash[SETTINGS_KEY].baseline_dir.name
    return (f"{shown(path)}: {files} {shown(other)} and {shown(path)} share the name '{stem}', so their items "
            f"would share baseline files ({baselines}/{stem}/) and result files; rename one of them")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using the kv_* fixtures: one test per combination of its kvcache marker's lists."""
    if "kv_params" not in metafunc.fixturenames:
        return
    clash = _stem_clash(metafunc.config, metafunc.definition.path)
    if clash:
        raise pytest.Collector.CollectError(clash)
    from .fixtures import parametrize

    parametrize(metafunc)


class ScenarioFile(pytest.File):
    """A scenario file; its errors are collection errors that say the file, key and fix
    (pytest's own: the message alone, the traceback under --fulltrace)."""

    def collect(self) -> Iterator[ScenarioItem]:
        from .scenarios import override_thresholds, parse_scenario, read_scenario_data

        from .storage_items import is_storage_data, storage_items

        clash = _stem_clash(self.config, self.path)
        if clash:
            raise self.CollectError(clash)
        try:
            data = read_scenario_data(self.path)
        except KVCacheError as exc:
            raise self.CollectError(str(exc)) from None
        if is_storage_data(data):  # phase: storage, no server (storage_items.py)
            yield from storage_items(self, data)
            return
        try:
            scenario = parse_scenario(data, self.path)
            overrides = self.config.stash[SETTINGS_KEY].thresholds
            cases = [override_thresholds(case, overrides) for case in scenario.cases]
        except KVCacheError as exc:
            raise self.CollectError(str(exc)) from None
        for case in cases:
            yield ScenarioItem.from_parent(self, name=case.name, callobj=_scenario_test, case=case)


class ScenarioItem(pytest.Function):
    """A scenario case run as a test; fixtures work as for a test function."""

    def __init__(self, *, case: ScenarioCase, **kwargs: Any) -> None:
        from .models import BACKENDS

        super().__init__(**kwargs)
        self.case = case
        self.add_marker("kvcache")
        self.add_marker(case.backend)
        if case.phase not in BACKENDS:
            self.add_marker(case.phase)

    @property
    def baseline_key(self) -> str:
        return f"{Path(self.case.path).stem}/{self.case.name}"

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"{self.case.name} ({Path(self.case.path).name})"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    from .fixtures import item_params

    filters = {
        "input_len": {v for values in config.getoption("input_len") for v in values},
        "concurrency": {v for values in config.getoption("concurrency") for v in values},
        "backend": {v for values in config.getoption("backend") for v in values},
        "output_len": {v for values in config.getoption("output_len") for v in values},
    }
    # An item of a scenario comparing LMCache modes exists to measure its own mode: under
    # another --kv-lmcache-mode it would measure that one under a false name.
    mode_override = config.getoption("kv_lmcache_mode")

    def filtered_out(item: pytest.Item) -> bool:
        if isinstance(item, ScenarioItem):
            case = item.case
            return any(wanted and getattr(case, dim) not in wanted for dim, wanted in filters.items()) or (
                mode_override is not None and case.compares_lmcache_modes and case.lmcache_mode != mode_override)
        params = item_params(item)
        # a filter on a list the test's marker does not give: not that value
        return params is not None and any(wanted and getattr(params, dim) not in wanted
                                          for dim, wanted in filters.items())

    dropped = [filtered_out(item) for item in items]
    if any(dropped):
        config.hook.pytest_deselected(items=[item for item, out in zip(items, dropped) if out])
    items[:] = _storage_first(_by_server([item for item, out in zip(items, dropped) if not out]))


def _storage_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The storage phase's items first, in their order: they start no server and measure
    this machine's tiers, which the inference items' servers leave busy for a while (here a
    disk read 30-40% slower in the minutes after the emulator's disk tiers than before them),
    so a storage item measures the same machine in the main job as under ``-m storage``."""
    first = [item for item in items if isinstance(item, ScenarioItem) and item.case.phase == "storage"]
    return first + [item for item in items if not (isinstance(item, ScenarioItem) and item.case.phase == "storage")]


def _by_server(items: list[pytest.Item]) -> list[pytest.Item]:
    """Fixture tests of one module grouped by server configuration, first seen first (as
    pytest groups tests by a module-scoped parameter): one server start per configuration.
    Every other item keeps its place."""
    from .fixtures import item_params, server_group

    slots: dict[Path, list[int]] = {}
    for index, item in enumerate(items):
        if item_params(item) is not None:
            slots.setdefault(item.path, []).append(index)
    out = list(items)
    for indices in slots.values():
        groups: dict[tuple, list[pytest.Item]] = {}
        for index in indices:
            params = item_params(items[index])
            assert params is not None  # the indices of fixture tests
            groups.setdefault(server_group(items[index], params), []).append(items[index])
        for index, item in zip(indices, (item for group in groups.values() for item in group)):
            out[index] = item
    return out
