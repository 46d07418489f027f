"""What `histoseek serve` can be told: limits, timeouts, access."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from histoseek.errors import HistoseekError

API_KEYS_ENV = "HISTOSEEK_API_KEYS"  # where keys are read from when no key file is given


def machine_memory_bytes() -> int:
    """Physical memory, or the container's (cgroup v2) limit where that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        return min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        return total


def default_decode_budget() -> int:
    """A quarter of the machine (the rest is for the index, Triton and everything else), at least 512 MB."""
    return max(512_000_000, machine_memory_bytes() // 4)


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int = 20_000_000
    # 25 MP (5000x5000) is far above a patch, and bounds what one request may decode to
    # (100 MB in Pillow's 4 bytes a pixel; what each form costs is in server/image_cost.py).
    max_pixels: int = 25_000_000
    # A patch is square or nearly: a 1 x 100,000 strip is not one, whatever its pixel count.
    max_aspect_ratio: float = 20.0
    max_k: int = 100
    default_k: int = 10
    # Decode memory of all requests in flight together; a request that does not fit waits
    # up to decode_wait_s for others to finish, then gets 503 with Retry-After.
    max_decode_bytes: int = field(default_factory=default_decode_budget)
    decode_wait_s: float = 5.0
    request_timeout_s: float = 30.0  # decode, embed and search of one request, then it is stopped (503)
    workers: int = 16  # threads that decode, embed and search; memory is bounded by the budget, not by them
    # Slide searches (server/api/slide_admission.py): admitted by their tiles against the
    # measured embedding rate, which starts at slide_start_rate tiles/s (low: a first burst
    # is refused rather than timed out); at most max_queued_slides admitted at once (each
    # holds its upload in a temporary file and an open slide, no pixels), run slide_workers
    # at a time. The deadline, not the count, is what normally refuses.
    slide_start_rate: float = 20.0
    max_queued_slides: int = 32
    slide_workers: int = 1
    # Connections: request headers due within header_timeout_s of opening (or of the previous
    # response), the body within body_timeout_s of the headers (20 MB at 3 Mbit/s); an idle
    # keep-alive connection is closed after keep_alive_s.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0
    triton_timeout_s: float = 30.0
    model_check_interval_s: float = 5.0  # how stale the served-model check may be
    api_keys: tuple[str, ...] = ()  # none: no key needed anywhere
    protect_search: bool = False  # keys for reads (search, indexes, thumbnails) too
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; none: CORS off
    # Folders holding text towers' tokenizer files (histoseek/text_tokenizer.py), searched before the
    # installed packages' own (open_clip ships CLIP's vocabulary).
    tokenizer_dirs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Here rather than in each caller: the guard, given no keys, would leave every read open.
        if self.protect_search and not self.api_keys:
            raise HistoseekError(f"--protect-search needs API keys: give --api-key-file FILE or set {API_KEYS_ENV}")
