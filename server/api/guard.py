"""API keys and body size, checked before the app reads a byte of a request's body.

With API keys configured, every request that changes an index needs one (and, with
`protect_search`, every read of the indexes too). Keys are never logged.
"""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.http_errors import json_error, megabytes
from server.api.settings import Settings

# Requests that only read; every other method (and any endpoint added later) counts as a write.
_READS = {("POST", "/v1/search"), ("POST", "/v1/search/slides"), ("POST", "/v1/search/text"),
          ("POST", "/v1/search/refine")}
# Refusals close the connection: that stops the client sending the rest of a refused body,
# which uvicorn would otherwise read and throw away to keep the connection alive.
_CLOSE = {"Connection": "close"}
_OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


class RequestGuard:
    """Refuses, before the body is read: requests without a valid API key, and bodies over the limit.

    A body without a Content-Length (chunked) is counted as it arrives and cut off at the
    limit, so that no upload is ever read, spooled or parsed beyond it.
    """

    def __init__(self, app, settings: Settings):
        self.inner = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.protect_search = settings.protect_search
        # Multipart overhead and the other form fields come on top of the image itself.
        self.max_body = settings.max_upload_bytes + 64 * 1024
        self.too_large = f"the request is larger than {megabytes(settings.max_upload_bytes)}; send a smaller image"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                # Raised inside the body parser, which stops there; the handlers answer 413.
                raise StarletteHTTPException(413, self.too_large, _CLOSE)
            return message

        await self.inner(scope, counted_receive, send)

    def refusal(self, scope, headers: Headers) -> JSONResponse | None:
        method, path = scope["method"], scope["path"]
        read = method in ("GET", "HEAD") or (method, path) in _READS
        if self.keys and path not in _OPEN_PATHS and (self.protect_search or not read):
            supplied = _supplied_key(headers)
            if supplied is None:
                return json_error(401, "this endpoint needs an API key: send it as `Authorization: Bearer <key>` "
                                   "or `X-API-Key: <key>`", {"WWW-Authenticate": "Bearer", **_CLOSE})
            # Every key is compared, in constant time, so timing tells nothing about any of them.
            valid = False
            for key in self.keys:
                valid |= hmac.compare_digest(supplied, key)
            if not valid:
                return json_error(403, "the API key is not valid for this server; use one of the keys given to "
                                   "`histoseek serve` (--api-key-file or HISTOSEEK_API_KEYS)", _CLOSE)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return json_error(413, self.too_large, _CLOSE)  # a huge upload costs nothing: it is never read
        return None


def _supplied_key(headers: Headers) -> bytes | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    key = token if scheme.lower() == "bearer" else headers.get("x-api-key", "")
    # Starlette decodes headers as latin-1: encoding back gives the bytes that were sent.
    return key.strip().encode("latin-1") or None
