"""Admission of the heavy part of a request (decode, embed, search): memory, time, abandonment.

- Memory: each request reserves what its decode will take (server/image_cost.py) from
  one budget shared by all requests before it starts; one that does not fit waits a
  little for others to finish, then is answered 503 with Retry-After. N concurrent
  uploads therefore never hold more than the budget, whatever N is.
- Time: a request has a deadline (--request-timeout); past it, or once its client has
  gone, its work is told to stop, and the decoder stops at its next block of input
  (histoseek.imaging reads in small blocks and checks between them), embedding and
  search are skipped. The memory stays reserved until the worker has really let go.
- The work runs in its own thread pool, so that slow decodes never take the threads
  that answer /healthz, /readyz and the cheap endpoints.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, TypeVar

from histoseek.errors import HistoseekError
from server.api.http_errors import megabytes
from server.job import Job, Stopped

log = logging.getLogger(__name__)
T = TypeVar("T")


class Busy(HistoseekError):
    """The decode budget stayed full for longer than a request may wait (503, Retry-After)."""


class OverBudget(HistoseekError):
    """One request alone would need more than the whole decode budget (413)."""


async def watched(future: asyncio.Future, job: Job, gone: Callable[[], Awaitable[bool]]):
    """`future`'s result, unless the job's deadline passes or its client goes first: then the
    job is told to stop (its worker sees it at its next check) and Stopped is raised."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.1)
        if done:
            return future.result()
        if time.monotonic() > job.deadline:
            job.stop("time")
            raise Stopped(job.message())
        if await gone():
            job.stop("client")
            raise Stopped(job.message())


class Admission:
    def __init__(self, budget_bytes: int, timeout_s: float, wait_s: float, workers: int):
        self.budget, self.timeout_s, self.wait_s = budget_bytes, timeout_s, wait_s
        self.in_use = 0
        self._conditions: dict[asyncio.AbstractEventLoop, asyncio.Condition] = {}
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="histoseek-work")
        self.peak = 0  # the most ever reserved at once

    def job(self) -> Job:
        """A new request's job: its deadline is --request-timeout from now."""
        return Job(time.monotonic() + self.timeout_s, self.timeout_s)

    async def run(self, cost: int, work: Callable[[Job], T], gone: Callable[[], Awaitable[bool]],
                  job: Job | None = None) -> T:
        """Reserve `cost` bytes, run `work(job)` in the pool, and return its result.
        `gone()` says whether the client has disconnected; `job`: the request's, when it has
        one already (a slide search's deadline covers its planning and its search)."""
        job = job or self.job()
        if cost > self.budget:
            raise OverBudget(f"decoding this image needs about {megabytes(cost)}, more than the server's whole "
                             f"decode budget of {megabytes(self.budget)} (--max-decode-mb); send a smaller image")
        await self._reserve(cost, max(0.0, min(self.wait_s, job.deadline - time.monotonic())))
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.pool, work, job)
        # Released when the worker returns, not when the request does: until then the memory is in use.
        future.add_done_callback(lambda done: self._finished(done, cost))
        return await watched(future, job, gone)

    def _changed(self) -> asyncio.Condition:
        # One per event loop: asyncio primitives belong to the loop they first wait on, and
        # test clients may drive one app from several loops, one after the other.
        loop = asyncio.get_running_loop()
        if loop not in self._conditions:
            self._conditions = {loop: asyncio.Condition()}
        return self._conditions[loop]

    async def _reserve(self, cost: int, wait_s: float) -> None:
        changed = self._changed()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self.in_use + cost <= self.budget), wait_s)
            except asyncio.TimeoutError:
                raise Busy(f"the server is decoding other images and its decode budget of {megabytes(self.budget)} "
                           f"is in use; retry in a moment") from None
            self.in_use += cost
            self.peak = max(self.peak, self.in_use)

    def _finished(self, future: asyncio.Future, cost: int) -> None:
        if not future.cancelled() and future.exception() is not None and isinstance(future.exception(), Stopped):
            log.info("stopped work: %s", future.exception())
        asyncio.get_running_loop().create_task(self._release(cost))

    async def _release(self, cost: int) -> None:
        changed = self._changed()
        async with changed:
            self.in_use -= cost
            changed.notify_all()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
