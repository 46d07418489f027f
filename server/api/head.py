"""HEAD answered wherever GET is: the same status and headers, no body.

FastAPI's routes answer only the methods they are declared with, so HEAD on a GET
endpoint was a 405 (Starlette's own routes, /docs among them, add HEAD themselves).
The request is routed as a GET; uvicorn sends no body for it, since the scope's method
is HEAD again by the time the response starts.
"""
from __future__ import annotations


class HeadAsGet:
    def __init__(self, app):
        self.inner = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.inner(scope, receive, send)

        async def send_as_head(message):
            scope["method"] = "HEAD"  # before uvicorn decides whether to write the body
            await send(message)

        # The scope itself (not a copy): uvicorn reads its method, and the metrics its route.
        scope["method"] = "GET"
        try:
            await self.inner(scope, receive, send_as_head)
        finally:
            scope["method"] = "HEAD"
