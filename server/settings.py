"""What `histoseek serve` can be told: limits, timeouts, access."""
from __future__ import annotations

from dataclasses import dataclass

from histoseek.errors import HistoseekError

API_KEYS_ENV = "HISTOSEEK_API_KEYS"  # where keys are read from when no key file is given


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int = 20_000_000
    # 25 MP (5000x5000) is far above a patch, and bounds what one request may decode to
    # (75 MB of RGB; more in passing for 16-bit or float images) while others run.
    max_pixels: int = 25_000_000
    max_k: int = 100
    default_k: int = 10
    triton_timeout_s: float = 30.0
    model_check_interval_s: float = 5.0  # how stale the served-model check may be
    api_keys: tuple[str, ...] = ()  # none: no key needed anywhere
    protect_search: bool = False  # keys for reads (search, indexes, thumbnails) too
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none: CORS off

    def __post_init__(self) -> None:
        # Here rather than in each caller: the guard, given no keys, would leave every read open.
        if self.protect_search and not self.api_keys:
            raise HistoseekError(f"--protect-search needs API keys: give --api-key-file FILE or set {API_KEYS_ENV}")
