"""Whole slides in the service: slide-to-slide search over mosaics, thumbnails and regions.

May import the search core, `server.index` and the ground's slide reading
(`histoseek.slides`); never `server.api`.
"""
