"""Where Milvus is, and calls to it that say what to do when they fail.

A URI is either
- a path ending in `.db`: Milvus Lite, embedded in this process (its gRPC server on a
  loopback port, in threads; the database is a folder). Only one process at a time can
  hold a Lite database (a lock file): the second one is told who probably holds it. The
  last connection of this process to a database closes it, releasing the lock;
- `http://HOST:19530` or `https://…`: a Milvus standalone or cluster. Credentials come from
  the MILVUS_TOKEN environment variable ("user:password" or an API key), or a
  `user:password@` in the URI, and are never written: `Target.public` is the URI without
  them (nor any query or fragment).

A `Connection` makes its MilvusClient on first use and drops it when Milvus stops
answering, so the next call reconnects: a restarted Milvus is used again without reopening
anything. A collection the restarted Milvus has released is loaded again. Every
pymilvus/gRPC error becomes a HistoseekError (BackendUnavailable when Milvus cannot be
reached, or a Lite database is held by another process) whose message says what to do.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import unquote, urlsplit

import grpc
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from histoseek.errors import HistoseekError
from server.index.backends.base import BackendUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# pymilvus logs every failed call (with its traceback) before raising it; each of those
# errors is raised here as a message saying what to do, with the original chained to it.
# Its query iterator warns on every listing from Milvus Lite (which keeps no MVCC timestamp).
for _name in ("pymilvus.decorators", "pymilvus.client.connection_manager", "pymilvus.client.iterator"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

TOKEN_ENV = "MILVUS_TOKEN"
CONNECT_TIMEOUT_S = 5.0  # connecting and check_available: an absent Milvus is reported quickly
CALL_TIMEOUT_S = 120.0  # searches, inserts, deletes, queries
SLOW_TIMEOUT_S = 1800.0  # building the index of a whole collection, loading it into memory
NOT_FOUND, NOT_LOADED = 100, 101  # Milvus's codes for a missing and a released collection


# -- where: the URI ------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    address: str  # what pymilvus connects to: an absolute `.db` path, or scheme://host:port[/db]
    public: str  # for the manifest and messages: never credentials
    token: str  # never written anywhere
    lite: bool

    @classmethod
    def parse(cls, uri: str, base: Path) -> "Target":
        """`uri` as given (a Lite path relative to `base`, or a server URI)."""
        uri = str(uri).strip()
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
            parts = urlsplit(uri)
            try:
                parts.port
            except ValueError:
                raise HistoseekError(f"Milvus URI {parts.scheme}://{parts.hostname or ''}… has no valid port; "
                                     "give http://HOST:19530") from None
            if parts.scheme.lower() not in ("http", "https", "tcp"):
                raise HistoseekError(f"Milvus URI {_public(uri)} has scheme {parts.scheme!r}; give http://HOST:19530, "
                                     "https://HOST:PORT or a Milvus Lite path ending in .db")
            if not parts.hostname:
                raise HistoseekError(f"Milvus URI {_public(uri)} names no host; give http://HOST:19530")
            public = _public(uri)
            token = os.environ.get(TOKEN_ENV) or _userinfo(parts)
            return cls(public, public, token, False)
        path = Path(uri).expanduser()
        path = path if path.is_absolute() else Path(base) / path
        if path.suffix != ".db":
            raise HistoseekError(f"Milvus URI {uri!r} is neither a server URI (http://HOST:19530) nor a Milvus Lite "
                                 "database path ending in .db (e.g. ./milvus.db)")
        path = Path(os.path.abspath(path))
        if path.is_file():
            raise HistoseekError(f"{path} is a file: Milvus Lite 3 keeps a database in a folder named *.db; "
                                 "give a new path")
        return cls(str(path), str(path), "", True)


def _public(uri: str) -> str:
    """`uri` without credentials, query or fragment."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


def _userinfo(parts) -> str:
    """The token a URI's `user:password@` gives (percent-escapes decoded)."""
    if not parts.username:
        return ""
    user = unquote(parts.username)
    return f"{user}:{unquote(parts.password)}" if parts.password else user


# -- Milvus Lite in this process ----------------------------------------------------------

class _UnimplementedCalls(logging.Filter):
    """The in-process Lite server logs a traceback for each call it does not implement
    (pymilvus's query iterator asks it for a timestamp, then does without)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], NotImplementedError))


logging.getLogger("grpc._server").addFilter(_UnimplementedCalls())


@dataclass
class _LiteServer:
    server: object  # grpc.Server
    db: object  # milvus_lite.MilvusLite: holds the database's lock file
    port: int
    users: int = 0


# Keyed by the database folder's path and inode: a rebuilt index folder's new database at
# the same path gets its own server while the replaced one still answers its last searches
# (pymilvus's own `.db` handling keys by path alone, and would hand out the old one).
_lite_servers: dict[tuple[str, int], _LiteServer] = {}
_lite_lock = threading.Lock()


def _open_lite(path: str, public: str) -> tuple[tuple[str, int], int]:
    """Use the in-process Lite server of the database folder `path`, started if there is
    none: (its key, to release it; its loopback port)."""
    from milvus_lite import DataDirLockedError, MilvusLiteError
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    os.makedirs(path, exist_ok=True)
    key = (path, os.stat(path).st_ino)
    with _lite_lock:
        entry = _lite_servers.get(key)
        if entry is None:
            try:
                server, db, port = start_server_in_thread(data_dir=path, host="127.0.0.1", port=0)
            except DataDirLockedError as exc:
                raise BackendUnavailable(
                    f"the Milvus Lite database {public} is open in another process (the API?): add and remove "
                    "items through the API while it serves, or run a Milvus server (--milvus-uri "
                    "http://HOST:19530)") from exc
            except (MilvusLiteError, OSError, RuntimeError) as exc:
                raise HistoseekError(f"cannot open the Milvus Lite database {public} ({exc}); check the path, "
                                     "or rebuild the index") from exc
            entry = _lite_servers[key] = _LiteServer(server, db, port)
        entry.users += 1
        return key, entry.port


def _release_lite(key: tuple[str, int]) -> None:
    """One user of a Lite server is done; the last one stops it and closes the database,
    releasing its lock for other processes."""
    with _lite_lock:
        entry = _lite_servers[key]
        entry.users -= 1
        if entry.users > 0:
            return
        del _lite_servers[key]
    entry.server.stop(grace=2).wait(5)  # calls in flight finish before the database closes
    entry.db.close()


@atexit.register
def _close_lite_databases() -> None:
    for key in list(_lite_servers):
        _lite_servers[key].users = 1
        _release_lite(key)


# -- a connection that comes back ---------------------------------------------------------

def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code()
    code = getattr(exc, "code", None)
    return code if isinstance(code, grpc.StatusCode) else None


def _detail(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "details", None)):
        return str(exc.details())
    return str(getattr(exc, "message", None) or exc).strip()


_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                grpc.StatusCode.CANCELLED)
_CONNECT_FAILED = 2


class Connection:
    """A MilvusClient made on first use and again after Milvus stopped answering."""

    def __init__(self, target: Target, must_exist: bool):
        self.target, self.must_exist = target, must_exist
        self._client: MilvusClient | None = None
        self._lite: tuple[str, int] | None = None  # the in-process Lite server this client uses
        self._lock = threading.RLock()

    def unreachable(self, detail: str) -> BackendUnavailable:
        return BackendUnavailable(f"cannot reach Milvus at {self.target.public} ({detail}); "
                                  "start it or fix --milvus-uri")

    def client(self) -> MilvusClient:
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> MilvusClient:
        target, uri, lite = self.target, self.target.address, None
        if target.lite:
            if self.must_exist and not Path(uri).is_dir():
                raise HistoseekError(f"the Milvus Lite database {uri} is missing; rebuild the index "
                                     "(histoseek index build --backend milvus)")
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
            lite, port = _open_lite(uri, target.public)
            uri = f"http://127.0.0.1:{port}"
        try:
            client = MilvusClient(uri=uri, token=target.token, timeout=CONNECT_TIMEOUT_S, dedicated=True)
        except BaseException as exc:
            if lite is not None:  # whatever failed, the Lite server started for this client goes
                _release_lite(lite)
            if isinstance(exc, (MilvusException, grpc.RpcError)):
                raise self.translate(exc, "connect", drop=False) from exc
            raise
        self._lite = lite
        return client

    def drop(self) -> None:
        """Forget the client (Milvus stopped answering, or closing): the next call reconnects."""
        with self._lock:
            client, self._client = self._client, None
            lite, self._lite = self._lite, None
        if client is not None:
            try:
                client.close()
            except Exception:  # a client whose server is gone may fail to close; it is dropped anyway
                log.debug("closing a Milvus client failed", exc_info=True)
        if lite is not None:
            _release_lite(lite)

    def translate(self, exc: BaseException, what: str, collection: str | None = None,
                  drop: bool = True) -> HistoseekError:
        """A pymilvus/gRPC error as an error whose message says what to do; when Milvus
        could not be reached, the client is dropped (`drop`) so the next call reconnects."""
        if isinstance(exc, HistoseekError):
            return exc
        status, code, detail = _grpc_code(exc), getattr(exc, "code", None), _detail(exc)
        if status in _UNREACHABLE or code == _CONNECT_FAILED:
            if drop:
                self.drop()
            return self.unreachable(detail)
        lowered = detail.lower()
        if status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or any(
                word in lowered for word in ("auth", "credential", "privilege", "permission denied")):
            return HistoseekError(f"Milvus at {self.target.public} refused to {what} ({detail}); set {TOKEN_ENV} to "
                                  "'user:password' or an API key allowed to use the collection")
        if collection and (code == NOT_FOUND or ("collection" in lowered and ("not exist" in lowered
                                                                                 or "not found" in lowered))):
            return HistoseekError(f"Milvus at {self.target.public} has no collection {collection}: it was dropped, or "
                                  "the index was rebuilt and this copy is stale; reopen the index, or rebuild it "
                                  "(histoseek index build --backend milvus)")
        return HistoseekError(f"Milvus at {self.target.public} could not {what}: {detail}")

    def call(self, what: str, fn: Callable[[MilvusClient], T], collection: str | None = None) -> T:
        """fn(client), its errors translated; a collection a restarted Milvus released is
        loaded again and the call repeated once."""
        client = self.client()
        try:
            return fn(client)
        except (MilvusException, grpc.RpcError) as exc:
            if collection is None or getattr(exc, "code", None) != NOT_LOADED:
                raise self.translate(exc, what, collection) from exc
        except ValueError as exc:  # another thread closed this client when Milvus went away
            if "closed channel" not in str(exc):
                raise
            raise self.unreachable(str(exc)) from exc
        try:
            client.load_collection(collection, timeout=SLOW_TIMEOUT_S)
            return fn(client)
        except (MilvusException, grpc.RpcError) as exc:
            raise self.translate(exc, what, collection) from exc
