"""Requests whose framing is ambiguous or malformed, refused with a clear 400 before the app reads them.

- Both Content-Length and Transfer-Encoding: the two say different things about where
  the body ends; a proxy in front may believe the other one, and what it takes for the
  next request would be served from inside this one's body (request smuggling). RFC 9112
  §6.3: reject, and close the connection.
- A multipart content type that is not exactly multipart/form-data, or has no boundary:
  the form parser would find no fields and the client would read "image: Field required".
- A multipart body that ends without its closing boundary (an upload cut short): the
  parser drops the unfinished part, with the same puzzling result.
"""
from __future__ import annotations

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.http_errors import json_error

_CLOSE = {"Connection": "close"}
AS_CURL = "as `curl -F image=@tile.png …` does"


class RequestFraming:
    def __init__(self, app):
        self.inner = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        headers = Headers(scope=scope)
        if "transfer-encoding" in headers and "content-length" in headers:
            refusal = json_error(400, "the request has both Content-Length and Transfer-Encoding, which contradict "
                                      "each other about where its body ends; send only one of them", _CLOSE)
            return await refusal(scope, receive, send)
        content_type = headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/"):
            return await self.inner(scope, receive, send)
        media_type, options = parse_options_header(content_type)
        if media_type != b"multipart/form-data" or not options.get(b"boundary"):
            why = ("has no boundary" if media_type == b"multipart/form-data"
                   else f"is {media_type.decode('latin-1')!r}, not multipart/form-data")
            refusal = json_error(400, f"the request's content type {why}; send the image as multipart/form-data, "
                                      f"{AS_CURL}", _CLOSE)
            return await refusal(scope, receive, send)
        await self.inner(scope, _expect_closing(receive, b"--" + options[b"boundary"] + b"--"), send)


def _expect_closing(receive, closing: bytes):
    """`receive`, which fails the body parser with a 400 if the body ends without `closing`."""
    tail, found = b"", False

    async def checked():
        nonlocal tail, found
        message = await receive()
        if message["type"] != "http.request" or found:
            return message
        window = tail + message.get("body", b"")
        found = closing in window
        tail = window[-(len(closing) - 1):]
        if not found and not message.get("more_body", False):
            raise StarletteHTTPException(
                400, "the multipart body ends without its closing boundary (was the upload cut short?); send the "
                     f"image again as multipart/form-data, {AS_CURL}", _CLOSE)
        return message

    return checked
