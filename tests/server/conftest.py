"""Fixtures of the server tests: the index most of them search, and the API serving it.

Embedding the 24 tiles through Triton is the slow part of an index, so `tissue_index` is
built once; tests and modules that add or delete items work on their own copies of it.
"""
from __future__ import annotations

import shutil
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from server.api.app import Settings, create_app
from server.index.build import build_index
from tests.servers import served_in_thread


@pytest.fixture(scope="session")
def tissue_index(tmp_path_factory, synth_data, triton_server) -> Path:
    """A flat index of `synth_data` (24 tiles) embedded by Triton's `tiny`. Never edit it:
    it is shared by the whole session; edit `indexes_dir` or `tissue_copy` instead."""
    return build_index("tiny", synth_data, tmp_path_factory.mktemp("tissue_index") / "tissue",
                       triton_url=triton_server.grpc_url, batch=8)


@pytest.fixture(scope="module")
def indexes_dir(tmp_path_factory, tissue_index) -> Path:
    """This module's own indexes folder, `<module folder>/indexes`, holding a copy of
    `tissue_index` as `tissue`: the module's tests may edit it."""
    indexes = tmp_path_factory.mktemp("module") / "indexes"
    shutil.copytree(tissue_index, indexes / "tissue")
    return indexes


@pytest.fixture
def tissue_copy(tmp_path, tissue_index) -> Path:
    """This test's own copy of `tissue_index`, as `tmp_path/indexes/tissue`."""
    return Path(shutil.copytree(tissue_index, tmp_path / "indexes" / "tissue"))


@pytest.fixture
def serve_api():
    """Factory: serve_api(indexes_dir, triton_url, protocol, settings, ready=) -> base URL of the
    app under uvicorn on loopback, once listening (with `ready`, once /readyz answers 200).
    The servers stop at the end of the test."""
    with ExitStack() as servers:
        def serve(indexes_dir: Path, triton_url: str, protocol: str = "grpc", settings: Settings | None = None,
                  *, ready: bool = False) -> str:
            app = create_app(indexes_dir, triton_url, protocol, settings)
            return servers.enter_context(served_in_thread(app, ready=ready))

        yield serve


@pytest.fixture
def client(api: str):
    """An HTTP client of the module's `api` (a base URL each module serves its own way)."""
    with httpx.Client(base_url=api, timeout=30) as http:
        yield http
