"""Prometheus metrics of the API: requests by endpoint and status, latency, search stages.

Every label comes from a closed set: a series is kept for ever, so a label taken from the
request (a made-up method, a raw path) would let anyone grow the metrics, and the
process, without bound (10,000 invented methods: /metrics 28 KB -> 19 MB).
"""
from __future__ import annotations

import time

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def install_metrics(app: FastAPI) -> None:
    # An app-local registry: several apps (tests, workers) never share or clash on metrics.
    registry = CollectorRegistry()
    requests = Counter("histoseek_requests", "HTTP requests by endpoint and status",
                       ["endpoint", "method", "status"], registry=registry)
    latency = Histogram("histoseek_request_duration_seconds", "HTTP request latency",
                        ["endpoint", "method"], registry=registry)
    app.state.stage_seconds = Histogram(
        "histoseek_search_stage_seconds", "Time per search stage (decode, preprocess, embed, search, total)",
        ["stage"], registry=registry, buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    class Middleware:
        def __init__(self, app):
            self.inner = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            started, status = time.perf_counter(), 500
            # Read now: inner layers may route a HEAD as a GET for a while.
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"

            async def record_status(message):
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, record_status)
            finally:
                # The route's template, never the raw path; statuses are the server's own.
                route = scope.get("route")
                endpoint = getattr(route, "path", "unmatched")
                requests.labels(endpoint, method, str(status)).inc()
                latency.labels(endpoint, method).observe(time.perf_counter() - started)

    app.add_middleware(Middleware)
