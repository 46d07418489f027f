"""A request's work and its stop signal, consulted between steps by whoever does the work.

The API's admission (server/api/admission.py) creates a `Job` per request and stops it when
the deadline passes or the client goes away; the search core and slide search only check it,
so they need nothing from the HTTP edge.
"""
from __future__ import annotations

import time

from histoseek.errors import HistoseekError


class Stopped(HistoseekError):
    """The request ran out of time or its client went away; its work stops (503)."""


class Job:
    """What a worker consults between steps: has its request been given up?"""

    def __init__(self, deadline: float, timeout_s: float):
        self.deadline, self.timeout_s = deadline, timeout_s
        self._why: str | None = None

    def stop(self, why: str) -> None:
        self._why = self._why or why

    def check(self) -> None:
        if self._why is None and time.monotonic() > self.deadline:
            self.stop("time")
        if self._why is not None:
            raise Stopped(self.message())

    def message(self) -> str:
        if self._why == "client":
            return "the client went away; the request was stopped"
        return (f"the request took longer than the server's limit of {self.timeout_s:g} s (--request-timeout) and "
                "was stopped; send a smaller or simpler image (a baseline JPEG or a PNG), or retry later")
