"""The HTTP edge: the FastAPI app and what guards it (framing, admission, keys, limits, metrics).

The top room of `server/`: it may import the core, `server.index` and `server.slides`;
nothing in `server/` imports it back.
"""
