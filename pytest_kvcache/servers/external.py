"""An OpenAI-compatible server somebody else started (``--kv-server external``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from ..errors import ServerError
from ._base import ServerHandle

__all__ = ["connect_external", "external_backend"]


def connect_external(endpoint: str | None, model: str | None) -> ServerHandle:
    if not endpoint:
        raise ServerError("--kv-server external needs --kv-endpoint URL (e.g. http://127.0.0.1:8000)")
    base_url = endpoint.rstrip("/")
    base_url = base_url.removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=10) as response:
            listing = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServerError(
            f"--kv-endpoint {endpoint}: GET /v1/models failed ({exc}); start the server first or fix the URL"
        ) from None
    served = [m["id"] for m in listing.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if model is None:
        if not served:
            raise ServerError(f"--kv-endpoint {endpoint} serves no model; pass --model NAME")
        model = served[0]
    elif served and model not in served:
        raise ServerError(f"--model {model!r} is not served by {endpoint}; it serves: {', '.join(served)}")
    info = {"server": "external", "endpoint": base_url, "gpu": "unknown"}
    version = _server_version(base_url)
    if version:
        info["server_version"] = version
    return ServerHandle(kind="external", base_url=base_url, model=model, info=info)


def _version_info(base_url: str, timeout: float = 10) -> tuple[dict | None, str]:
    """The server's ``GET /version`` object, or None and why not (no such endpoint, no server)."""
    try:
        with urllib.request.urlopen(f"{base_url}/version", timeout=timeout) as response:
            data = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, f"GET /version failed ({exc})"
    return (data, "") if isinstance(data, dict) else (None, "GET /version is no JSON object")


def _server_version(base_url: str) -> str | None:
    """What the server says of its version (vLLM's ``GET /version``: ``{"version": "0.11.0"}``),
    or None where it has no such endpoint: the software under test, compared across runs."""
    version = (_version_info(base_url)[0] or {}).get("version")
    return str(version) if isinstance(version, (str, int, float)) and str(version) else None


def external_backend(endpoint: str, timeout: float = 3.0) -> tuple[str | None, str]:
    """The offload backend the server at ``endpoint`` says it runs (the built-in emulator's
    ``GET /version`` has ``kvcache_backend``; vLLM's does not): ``(name, "")``, or
    ``(None, why it says nothing)``."""
    data, problem = _version_info(endpoint.rstrip("/").removesuffix("/v1"), timeout)
    if data is None:
        return None, problem
    backend = data.get("kvcache_backend")
    if not isinstance(backend, str) or not backend:
        return None, "its GET /version does not name its offload backend"
    return backend, ""
