"""The exception tree of pytest-kvcache.

Every error the plugin raises on purpose derives from :class:`KVCacheError`, so a
caller can catch the whole family, and each message names the file, option or process
at fault and the fix::

    KVCacheError
    ├── ScenarioError          a scenario YAML file is malformed
    ├── WorkloadError          prompts could not be built (tokenizer, dataset)
    ├── ServerError            a server process failed to start, died or is unreachable
    ├── BackendUnavailable     (backends) a backend cannot run here; the item is skipped with the reason
    ├── TierUnavailable        (storage.tiers) a storage tier cannot run here (gds without a mount); also an
    │                          OSError; the storage item is skipped with the reason
    ├── HTTPStreamError        (_http) a benchmark request's connection broke or its response was not HTTP/1.1
    ├── ClientProcessError     (spread) a client process of --kv-client-processes failed or died
    ├── CalibrationError       (calibrate) a server could not be calibrated
    ├── ResultsError           (report.rows) a results folder or file cannot be read
    ├── ProfileFileError       (emulator.profile_file) an emulator profile file is unusable; also a ValueError
    ├── BaselineError          (see baselines.py) a stored baseline cannot be used
    │   ├── BaselineCorruptError   a file that cannot be read (BaselineSchemaError: of a newer schema)
    │   └── TestbedMismatchError   recorded on another testbed
    └── HistoryError           the run history store cannot be opened, read or written
"""

from __future__ import annotations

__all__ = [
    "BaselineCorruptError",
    "BaselineError",
    "BaselineSchemaError",
    "HistoryError",
    "KVCacheError",
    "ScenarioError",
    "ServerError",
    "TestbedMismatchError",
    "WorkloadError",
]


class KVCacheError(Exception):
    """Base class of every error raised on purpose by pytest-kvcache."""


class ScenarioError(KVCacheError):
    """A scenario file is malformed; the message names the file and the key."""

    def __init__(self, path: object, key: str, problem: str) -> None:
        self.path = str(path)
        self.key = key
        self.problem = problem
        super().__init__(f"{self.path}: key '{key}': {problem}")


class WorkloadError(KVCacheError):
    """Prompts for a workload could not be built (tokenizer, dataset, lengths)."""


class ServerError(KVCacheError):
    """A server process failed to start, died, or could not be reached."""


class BaselineError(KVCacheError):
    """A stored baseline cannot be used (corrupt file, or recorded on another setup)."""


class BaselineCorruptError(BaselineError):
    """A baseline file cannot be read: bad JSON, wrong schema version, missing or
    mistyped fields. The file is never repaired or overwritten; the message names the
    path, what is wrong, and how to restore it."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(
            f"baseline file {self.path} is corrupt: {problem}; restore it from git "
            f"(git checkout -- {self.path}) or delete it and rerun with --update-baselines"
        )


class BaselineSchemaError(BaselineCorruptError):
    """A baseline file of a newer schema than this plugin reads: not corrupt, but not
    readable here either, and never overwritten; the message names both versions."""

    def __init__(self, path: object, version: int, supported: int) -> None:
        from . import __version__

        self.version = version
        self.supported = supported
        problem = f"schema_version {version} is newer than this pytest-kvcache ({__version__}) reads"
        BaselineError.__init__(
            self,
            f"baseline file {path} has schema_version {version}; this pytest-kvcache ({__version__}) reads "
            f"schema_version {supported} (and 1): it was written by a newer pytest-kvcache; upgrade this one "
            f"(pip install -U pytest-kvcache) to compare with it; the file is left as it is",
        )
        self.path = str(path)
        self.problem = problem


class TestbedMismatchError(BaselineError):
    """The stored baseline was recorded on another testbed (hardware, labels, model,
    offload configuration, workload or measurement version; see identity.py).
    ``differences`` lists one line per differing key; the message says how to start a
    new baseline after an intended change."""

    __test__ = False  # not a test class, whatever pytest's collection thinks of the name

    def __init__(self, key: str, path: object, differences: list[str]) -> None:
        self.key = key
        self.path = str(path)
        self.differences = list(differences)
        lines = "\n  ".join(self.differences)
        super().__init__(
            f"baseline {key!r} ({self.path}) was recorded on another testbed:\n"
            f"  {lines}\n"
            "pass --reset-baselines to start a new baseline on this testbed after an intended change"
        )


class HistoryError(KVCacheError):
    """The run history (see pytest_kvcache.history) cannot be used: a bad URL, an
    unreachable server, a file that is not a history database or is of a newer schema, a
    bad ``history.json``; the message names the URL or file and the fix."""
