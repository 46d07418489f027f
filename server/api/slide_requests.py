"""One slide search request at the HTTP edge: plan it (under the decode budget), admit it by
its tiles (server/api/slide_admission.py), run it, and never leave a file or an open slide behind.

The query's plan (an open slide and, for an upload, the private temporary file it was saved
to) is used by up to three parties that may finish in any order: the request, the worker
that plans it and the worker that searches it (a stopped request returns while its worker
is still between two tiles). `SharedPlan` closes it when the last of them lets go.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Awaitable, Callable

from histoseek.imaging import ImageTooLarge
from server.api.admission import Admission
from server.api.http_errors import megabytes
from server.api.settings import Settings
from server.api.slide_admission import Interactive, SlideQueue
from server.index.fields import upload_name
from server.job import Job, Stopped
from server.search import BadImage
from server.slides.search import QueryPlan, SlideSearch, SlideSearchOutcome


class SharedPlan:
    """A query plan and its temporary file, closed once, by whoever lets go of it last."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 1  # the request
        self.plan: QueryPlan | None = None
        self.path: str | None = None

    def enter(self) -> bool:
        with self._lock:
            if self._users == 0:
                return False
            self._users += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            if self.plan is not None:
                self.plan.close()
            if self.path is not None:
                os.unlink(self.path)


async def search_slide(*, searcher: SlideSearch, slide_id: str | None, upload, k: int, settings: Settings,
                       admission: Admission, queue: SlideQueue, interactive: Interactive,
                       gone: Callable[[], Awaitable[bool]]) -> SlideSearchOutcome:
    """Reserve a place in the slide queue, plan the query, admit it by its tiles, search it."""
    job = admission.job()
    progress = queue.reserve(job)  # SlidesBusy (503 + Retry-After) at once when the queue is full
    shared, handed = SharedPlan(), False
    try:
        # A query reads one low level of at most max_pixels to plan: that is the memory
        # reserved from the decode budget (its tiles are read EMBED_BATCH at a time later).
        cost = settings.max_pixels * 4 + 64_000_000

        def plan(job: Job) -> int:
            if not shared.enter():
                raise Stopped(job.message())
            try:
                if slide_id is not None:
                    shared.plan = searcher.plan_id(slide_id)
                else:
                    _save_upload(upload, settings, shared)
                    shared.plan = searcher.plan_file(Path(shared.path), name=upload_name(upload.filename),
                                                     max_overview_pixels=settings.max_pixels)
                return shared.plan.tiles
            finally:
                shared.leave()

        tiles = await admission.run(cost, plan, gone, job=job)
        queue.admit(progress, tiles, job)

        def search(job: Job, progress) -> SlideSearchOutcome:
            if not shared.enter():
                raise Stopped(job.message())
            try:
                def check() -> None:  # before each batch of tiles: patch searches first
                    interactive.give_way()
                    job.check()

                return searcher.search_plan(shared.plan, k, check, progress)
            finally:
                shared.leave()

        handed = True
        return await queue.run(progress, search, job, gone)
    finally:
        if handed:  # its worker removes it; stopped, it does at most one more batch
            progress.tiles = progress.done
        else:
            queue.release(progress)
        shared.leave()


def _save_upload(upload, settings: Settings, shared: SharedPlan) -> None:
    """The upload, copied to a private temporary file (OpenSlide reads files) a block at a time,
    never whole in memory; its name is never shown."""
    name, limit = upload_name(upload.filename), settings.max_upload_bytes
    size = upload.size if upload.size is not None else limit + 1
    if size > limit:
        raise ImageTooLarge(f"{name} is larger than {megabytes(limit)}; search with a slide of the index "
                            "(slide_id) or raise --max-upload-mb")
    if size == 0:
        raise BadImage(f"{name} is empty: send a slide file (tiled TIFF, SVS, …)")
    from histoseek.slides.reader import SLIDE_SUFFIXES

    # OpenSlide tells formats by content, some (NDPI) by the suffix too: keep a known one.
    suffix = Path(name).suffix.lower()
    handle, shared.path = tempfile.mkstemp(prefix="histoseek-slide-",
                                           suffix=suffix if suffix in SLIDE_SUFFIXES else ".tiff")
    upload.file.seek(0)
    with os.fdopen(handle, "wb") as f:
        shutil.copyfileobj(upload.file, f, 1 << 20)
