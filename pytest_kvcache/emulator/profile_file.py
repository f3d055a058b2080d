"""Profile files: an emulator profile fitted by ``python -m pytest_kvcache calibrate``.

A profile file is JSON with a ``schema_version``, the profile's fields (any subset of
:class:`~.costmodel.Profile`'s; the rest come from the ``quick`` profile) and the
calibration's record (what was measured, the fit, the held-out check)::

    {"schema_version": 1, "kind": "pytest-kvcache emulator profile",
     "profile": {"name": "calibrated-tiny", "prefill_base_ms": 14.2, ...},
     "calibration": {...}}

Wherever a profile name is accepted (``--profile`` of the emulator,
``--emulator-profile`` of the plugin) the path of such a file is accepted too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import KVCacheError
from .costmodel import PROFILES, Profile, apply_overrides, make_profile

__all__ = ["PROFILE_FILE_KIND", "PROFILE_FILE_SCHEMA_VERSION", "ProfileFileError", "is_profile_path",
           "profile_label", "read_profile_file", "resolve_profile", "write_profile_file"]

PROFILE_FILE_SCHEMA_VERSION = 1
PROFILE_FILE_KIND = "pytest-kvcache emulator profile"


class ProfileFileError(KVCacheError, ValueError):
    """A profile file cannot be used; the message names the file and the fix."""


def is_profile_path(spec: str) -> bool:
    """A profile given as a file rather than a name (a name never ends in .json or has a slash)."""
    return spec.endswith(".json") or "/" in spec


def read_profile_file(path: str | Path) -> tuple[Profile, dict[str, Any]]:
    """The profile a file holds and its calibration record."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileFileError(f"profile file {path}: no such file; write one with "
                               "'python -m pytest_kvcache calibrate --out FILE'") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileFileError(f"profile file {path}: cannot be read as JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != PROFILE_FILE_KIND:
        raise ProfileFileError(f"profile file {path}: not an emulator profile (its 'kind' must be "
                               f"{PROFILE_FILE_KIND!r})")
    if data.get("schema_version") != PROFILE_FILE_SCHEMA_VERSION:
        raise ProfileFileError(f"profile file {path}: schema_version {data.get('schema_version')!r}, this "
                               f"version reads {PROFILE_FILE_SCHEMA_VERSION}; calibrate again")
    fields = data.get("profile")
    if not isinstance(fields, dict) or not isinstance(fields.get("name"), str) or not fields["name"]:
        raise ProfileFileError(f"profile file {path}: 'profile' must be an object with a 'name'")
    if fields["name"] in PROFILES:
        raise ProfileFileError(f"profile file {path}: name {fields['name']!r} is a built-in profile's; "
                               "choose another")
    overrides = {k: v for k, v in fields.items() if k not in ("name", "kind", "description")}
    if fields.get("kind", "modeled") != "modeled":
        raise ProfileFileError(f"profile file {path}: only modeled profiles can be stored in a file")
    try:
        profile = apply_overrides(PROFILES["quick"], overrides)
    except (TypeError, ValueError) as exc:
        raise ProfileFileError(f"profile file {path}: {exc}") from None
    negative = [k for k, v in profile.as_dict().items() if isinstance(v, float) and v < 0]
    if negative:
        raise ProfileFileError(f"profile file {path}: negative times or factors: {', '.join(negative)}")
    profile = _renamed(profile, fields["name"], str(fields.get("description", "")))
    calibration = data.get("calibration")
    return profile, calibration if isinstance(calibration, dict) else {}


def write_profile_file(path: str | Path, profile: Profile, calibration: Mapping[str, Any]) -> Path:
    """Write ``profile`` and its calibration record atomically; returns the path."""
    from .._atomic import write_text_atomic

    document = {"schema_version": PROFILE_FILE_SCHEMA_VERSION, "kind": PROFILE_FILE_KIND,
                "profile": profile.as_dict(), "calibration": dict(calibration)}
    path = Path(path)
    write_text_atomic(path, json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path


def resolve_profile(spec: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """A built-in profile by name, or the profile of a file, with ``overrides`` applied."""
    if not is_profile_path(spec):
        return make_profile(spec, overrides)
    profile, _ = read_profile_file(spec)
    return apply_overrides(profile, overrides)


def profile_label(spec: str) -> str:
    """How results name a profile: a built-in name, or a file's profile name and content digest
    (a refitted file is another profile for the baselines' testbed)."""
    if not is_profile_path(spec):
        return spec
    profile, _ = read_profile_file(spec)
    digest = hashlib.sha256(json.dumps(profile.as_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return f"{profile.name} (file, {digest})"


def _renamed(profile: Profile, name: str, description: str) -> Profile:
    return dataclasses.replace(profile, name=name, description=description)
