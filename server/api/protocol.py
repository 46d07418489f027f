"""uvicorn's h11 protocol with the connection timeouts it lacks, and the server's config.

uvicorn times out only a keep-alive connection that stays silent after a response, and
any byte resets that timer: a connection that never sends a request, one that sends its
headers a byte at a time, or one that trickles its body would be held open for ever, and
a few hundred such clients hold every connection. Here a connection must finish its
request headers within `header_timeout_s` of opening (or of its previous response), and
its body within `body_timeout_s` of the headers; otherwise it is closed.
"""
from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.settings import Settings


class TimedH11Protocol(H11Protocol):
    header_timeout_s = Settings.header_timeout_s
    body_timeout_s = Settings.body_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for = "headers"
        self._arm(self.header_timeout_s)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self._waiting_for == "headers" and self.cycle is not cycle:  # a request's headers are complete
            self._waiting_for = "body"
            self._arm(self.body_timeout_s)
        if self._waiting_for == "body" and self.cycle is not None and not self.cycle.more_body:
            self._waiting_for = "response"
            self._disarm()

    def on_response_complete(self) -> None:
        # Armed first: uvicorn may go on at once with a pipelined request (handle_events above).
        # Bytes of the next request do not reset this timer, unlike uvicorn's keep-alive one.
        self._waiting_for = "headers"
        self._arm(self.header_timeout_s)
        super().on_response_complete()  # arms uvicorn's keep-alive timeout (silence after a response)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired, self._waiting_for)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, waiting_for: str) -> None:
        if self._waiting_for != waiting_for or self.transport.is_closing():
            return
        self.logger.info("closing a connection that did not send its request %s in time", waiting_for)
        # The app, if reading the body, sees a disconnect and stops.
        self.transport.close()


def uvicorn_config(app, host: str, port: int, settings: Settings, log_level: str = "info") -> uvicorn.Config:
    """The API's uvicorn configuration: h11 with the timeouts above, keep-alive as set."""
    protocol = type("TimedH11", (TimedH11Protocol,), {"header_timeout_s": settings.header_timeout_s,
                                                      "body_timeout_s": settings.body_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=settings.keep_alive_s)
