"""Admission of slide searches by their cost in tiles, against the embedding rate the server measures.

A slide search's cost is known once its mosaic is planned: the tiles it will read and
embed. Slide work runs in its own small pool (`slide_workers` threads, one by default:
the tiles of concurrent slides would only share the same Triton instance and cores), in
arrival order, so it never takes the threads of patch searches, and only one slide's
batches at a time stand in Triton's queue, sent at a lower priority than patch queries.

The rule, decided before any tile is read:

    wait  = (tiles of the other admitted slides not yet embedded) / (rate * workers)
    admit when  wait + tiles / rate  <=  SAFETY * (time left before the request's deadline)
            and fewer than `max_queued` slide searches are admitted and unfinished

Until the first slide search has finished, the estimate is a guess: then a search that
finds the queue empty is admitted whatever it says (one probe at a time). It is applied twice: when the request arrives, with the tiles a query is expected to have
(a running mean of recent mosaics, at first the most a query may have), before the upload
is even planned, so that a burst is refused in milliseconds; and once the mosaic is
planned, with its real count.

otherwise the request is answered at once with 503 and Retry-After = the seconds until
enough of the queue has drained for it to fit (at least 1). `rate` is tiles per second of
one slide search's work (read, embed, search), an exponentially weighted mean over the
slide searches that ran (weight ALPHA for the newest; a stopped one counts the tiles it did), starting from a conservative
`start_rate` until the first has finished; it is the server's own measurement, so a GPU or
a slower encoder changes it without a setting. A request whose client goes or whose
deadline passes stops between batches of tiles (job.check), including before its turn.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, TypeVar

from histoseek.errors import HistoseekError
from server.api.admission import watched
from server.job import Job

log = logging.getLogger(__name__)
T = TypeVar("T")

ALPHA = 0.3  # weight of the newest measurement in the rate's running mean
SAFETY = 0.8  # admitted work must fit in this share of the time left (estimates err)


class Interactive:
    """Patch searches in flight, which slide work gives way to: before each batch of tiles a
    slide search waits (up to `most_s`) until none is running, so that on a machine of few
    cores a patch query does not share them with mosaic tiles being read and resized.
    Bounded, so that a steady stream of patch queries slows the slides but never stops them."""

    def __init__(self, most_s: float = 0.2):
        self.most_s = most_s
        self._running = 0
        self._clear = threading.Condition()

    def __enter__(self) -> "Interactive":
        with self._clear:
            self._running += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._clear:
            self._running -= 1
            if not self._running:
                self._clear.notify_all()

    def give_way(self) -> None:
        with self._clear:
            self._clear.wait_for(lambda: self._running == 0, self.most_s)


class SlidesBusy(HistoseekError):
    """The slide queue cannot finish this search before its deadline (503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Progress:
    """What a slide search's worker reports: tiles done so far (the queue's estimate uses it)."""

    def __init__(self, tiles: int):
        self.tiles, self.done = tiles, 0

    def advance(self, tiles: int) -> None:
        self.done = min(self.tiles, self.done + tiles)

    @property
    def left(self) -> int:
        return self.tiles - self.done


class SlideQueue:
    def __init__(self, start_rate: float = 20.0, max_queued: int = 32, workers: int = 1, max_tiles: int = 256,
                 after_each: Callable[[], None] | None = None):
        self.rate, self.max_queued, self.workers = float(start_rate), max_queued, workers
        self.expected = float(max_tiles)  # tiles a query's mosaic is expected to have, until planned
        self.measured = 0  # finished slide searches the rate has learnt from
        self.admitted: list[Progress] = []
        self.refused = 0
        self._lock = threading.Lock()
        self._after_each = after_each  # e.g. hand freed memory back, once the queue is empty
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="histoseek-slides")

    # -- the estimate ---------------------------------------------------------------------

    def _left(self, besides: Progress | None = None) -> int:
        return sum(p.left for p in self.admitted if p is not besides)

    def backlog_s(self) -> float:
        """Seconds until the admitted slide work is done, at the measured rate."""
        with self._lock:
            return self._left() / (self.rate * self.workers)

    def _refusal(self, tiles: int, timeout_s: float, backlog_s: float, why: str) -> SlidesBusy:
        # The queue drains at rate*workers; a request sent again gets a whole deadline of its own.
        retry = max(1, math.ceil(backlog_s + tiles / self.rate - SAFETY * timeout_s))
        return SlidesBusy(f"the server is busy with other slide searches ({why}); retry in {retry} s, or search "
                          "with a slide of the index (slide_id)", retry)

    def reserve(self, job: Job) -> Progress:
        """Before planning: a place in the queue at the expected cost (the mean mosaic of recent
        queries, at first the most a query may have), or SlidesBusy at once. Planning is the
        upload's decode; refusing before it keeps a burst of uploads from costing seconds each."""
        time_left = job.deadline - time.monotonic()
        with self._lock:
            expected = round(self.expected)
            backlog = self._left() / (self.rate * self.workers)
            if len(self.admitted) >= self.max_queued:
                why = f"{len(self.admitted)} slide searches are queued, the most it takes"
            elif backlog + expected / self.rate > SAFETY * time_left and not self._probe():
                why = f"its queue needs {backlog:.0f} s, and a slide about {expected / self.rate:.0f} s more"
            else:
                progress = Progress(expected)
                self.admitted.append(progress)
                return progress
            self.refused += 1
        raise self._refusal(expected, job.timeout_s, backlog, why)

    def admit(self, progress: Progress, tiles: int, job: Job) -> None:
        """The planned cost replaces the expected one: kept if it can finish before the deadline,
        else the place is given up and SlidesBusy raised (never work that cannot finish in time)."""
        time_left = job.deadline - time.monotonic()
        with self._lock:
            self.expected = ALPHA * tiles + (1 - ALPHA) * self.expected
            backlog = self._left(besides=progress) / (self.rate * self.workers)
            if backlog + tiles / self.rate <= SAFETY * time_left or self._probe(besides=progress):
                progress.tiles = tiles
                return
            self.admitted.remove(progress)
            self.refused += 1
        raise self._refusal(tiles, job.timeout_s, backlog,
                            f"{tiles} tiles to embed at {self.rate:.0f} tiles/s after {backlog:.0f} s of queue would "
                            "end after the request's deadline")

    def _probe(self, besides: Progress | None = None) -> bool:
        """Until a slide search has been measured, one at a time is admitted whatever the
        starting estimate says: an idle server must not refuse its first slide."""
        return self.measured == 0 and not any(p is not besides for p in self.admitted)

    def release(self, progress: Progress) -> None:
        """Give up a place that never ran (planning failed, or the request stopped)."""
        with self._lock:
            if progress in self.admitted:
                self.admitted.remove(progress)

    # -- the work -------------------------------------------------------------------------

    async def run(self, progress: Progress, work: Callable[[Job, Progress], T], job: Job,
                  gone: Callable[[], Awaitable[bool]]) -> T:
        """`work(job, progress)` in the slide pool (after the admitted work before it); stopped
        when the client goes or the deadline passes: the work checks `job` before each batch of
        tiles, before its first too, so a search given up while queued reads and sends nothing."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, self._timed, progress, work, job)
        try:
            return await watched(future, job, gone)
        finally:
            if not future.done():
                job.stop("client")  # cancelled: nobody waits for the answer (a no-op after a stop above)

    def _timed(self, progress: Progress, work: Callable[[Job, Progress], T], job: Job) -> T:
        started = time.monotonic()
        try:
            return work(job, progress)
        finally:
            elapsed = time.monotonic() - started
            with self._lock:
                self.release_locked(progress)
                # Stopped work teaches the rate too, by the tiles it did: a first search that
                # runs out of time must not leave the queue guessing.
                if progress.done and elapsed > 0:
                    measured = progress.done / elapsed
                    self.rate = measured if self.measured == 0 else ALPHA * measured + (1 - ALPHA) * self.rate
                    self.measured += 1
                empty = not self.admitted
            if empty and self._after_each is not None:
                self._after_each()

    def release_locked(self, progress: Progress) -> None:
        if progress in self.admitted:
            self.admitted.remove(progress)

    def snapshot(self) -> dict:
        with self._lock:
            return {"rate_tiles_per_s": round(self.rate, 2), "measured": self.measured,
                    "queued": len(self.admitted), "tiles_left": sum(p.left for p in self.admitted),
                    "refused": self.refused}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
