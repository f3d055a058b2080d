"""What the emulator is configured with: :class:`Settings` (the command line builds one)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import __version__
from .._openai_request import RequestLimits
from .costmodel import Profile, make_profile

__all__ = ["EMULATOR_KEYS", "Settings"]

#: --config-json keys that are not profile fields (see Settings)
EMULATOR_KEYS = {
    "use_odirect": bool,
    "spin_ms": float,
    "vocab_size": int,
    "error_rate": float,
    "crash_after": int,
    "stall_ms": float,
    "stall_every": int,
    "default_max_tokens": int,
    "send_headers_early": bool,
    "offload_disabled": bool,
    "jitter": float,
    "slowdown_prefill": float,
    "slowdown_decode": float,
    "slowdown_load": float,
    "redis_url": str,
    "read_delay_ms": float,
    "corrupt_rate": float,
}


@dataclass
class Settings:
    """Everything the emulator is configured with (the CLI builds one)."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "emulated-model"
    backend: str = "none"
    profile: Profile = field(default_factory=lambda: make_profile("quick"))
    slowdown: float = 1.0
    seed: int = 0
    chunk_size: int = 256
    disk_path: str | None = None
    cpu_size_gb: float = 128.0
    disk_size_gb: float = 512.0
    payload_scale: float = 1 / 4096
    max_model_len: int = 131072
    # --config-json extras (EMULATOR_KEYS)
    use_odirect: bool = False
    spin_ms: float = 1.5
    vocab_size: int = 32000
    error_rate: float = 0.0
    crash_after: int = 0
    stall_ms: float = 0.0
    stall_every: int = 0
    default_max_tokens: int = 16
    send_headers_early: bool = False
    offload_disabled: bool = False
    jitter: float = 0.0
    slowdown_prefill: float = 1.0
    slowdown_decode: float = 1.0
    slowdown_load: float = 1.0
    redis_url: str | None = None
    redis_size_gb: float = 512.0
    served_version: str = __version__
    read_delay_ms: float = 0.0
    corrupt_rate: float = 0.0
    limits: RequestLimits = RequestLimits()  # see the docstring of .app

    def check(self) -> None:
        """Refuse settings the emulator cannot run with (the command line says it first)."""
        if self.backend in ("disk", "gds", "waterfall") and not self.disk_path:
            raise ValueError(f"--backend {self.backend} needs --disk-path")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if not 0.0 <= self.corrupt_rate <= 1.0:
            raise ValueError("corrupt_rate must be in [0, 1]")
        for k in ("slowdown_prefill", "slowdown_decode", "slowdown_load"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0")
