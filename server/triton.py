"""Start, stop and inspect the pip-installed Triton server in the background.

The `tritonserver` binary ships inside the `nvidia-pytriton` wheel of `.venv-triton`
(its own small environment, because the python backend needs numpy<2). We launch it
the way pytriton does (pytriton/triton.py, server/triton_server.py):
- a backend directory whose `python/` holds the python backend library, its utils and
  the backend stub built for the environment's Python version (the wheel keeps one stub
  per version apart, so the backend folder alone cannot start models); we link these
  under `<run_dir>/backends/` instead of changing the environment;
- LD_LIBRARY_PATH with the environment's libpython folder (the stub links libpython) and
  the wheel's bundled libraries; the environment's `bin` first on PATH, because the
  embedded interpreter finds its venv (and so numpy<2, onnxruntime) from `python3` there.

Model control is `explicit` with `--load-model=*`: every model in the repository loads
at start, and a new version can be loaded into the running server with
`POST /v2/repository/models/<name>/load` instead of a restart.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from histoseek.atomic import write_json
from histoseek.errors import HistoseekError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECORD = "triton.json"
LOG = "triton.log"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
# Printed by Triton on every machine without a GPU; not the reason a start failed.
_NOISE = ("CudaDriverHelper has not been initialized",)


@dataclass(frozen=True)
class TritonInfo:
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    repo: str
    run_dir: str
    log: str

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"


def free_port() -> int:
    """A TCP port nobody listens on right now (for tests; another process may take it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def default_triton_env() -> Path:
    """HISTOSEEK_TRITON_ENV, else `.venv-triton` here, else next to the project."""
    if os.environ.get("HISTOSEEK_TRITON_ENV"):
        candidates = [Path(os.environ["HISTOSEEK_TRITON_ENV"])]
    else:
        candidates = [Path.cwd() / ".venv-triton", PROJECT_ROOT / ".venv-triton"]
    for candidate in candidates:
        if (candidate / "bin" / "python").exists():
            return candidate.resolve()
    raise HistoseekError(
        f"no Triton environment at {' or '.join(map(str, candidates))}; "
        "run `make setup` to create .venv-triton, or set HISTOSEEK_TRITON_ENV"
    )


def _clean_env() -> dict[str, str]:
    # The app's own Python settings (numpy 2 on PYTHONPATH) must not leak into the stub.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _probe(triton_env: Path) -> dict[str, str]:
    """Ask the environment's interpreter where its libpython and packages live."""
    code = (
        "import json, sys, sysconfig; print(json.dumps({"
        "'libdir': sysconfig.get_config_var('LIBDIR'), "
        "'version': '%d.%d' % sys.version_info[:2], "
        "'purelib': sysconfig.get_paths()['purelib']}))"
    )
    out = subprocess.run(
        [str(triton_env / "bin" / "python"), "-c", code],
        capture_output=True, text=True, env=_clean_env(), check=False,
    )
    if out.returncode != 0:
        raise HistoseekError(f"the Python of {triton_env} does not run ({out.stderr.strip()}); "
                             "recreate it with `make setup`")
    return json.loads(out.stdout)


def _prepare(triton_env: Path, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Binary, backend directory and environment for this Triton environment."""
    probe = _probe(triton_env)
    dist = Path(probe["purelib"]) / "pytriton" / "tritonserver"
    binary = dist / "bin" / "tritonserver"
    stub = dist / "python_backend_stubs" / probe["version"] / "triton_python_backend_stub"
    for needed in (binary, stub, *(dist / "backends" / "python" / f for f in _BACKEND_FILES)):
        if not needed.exists():
            raise HistoseekError(f"{needed} is missing: {triton_env} lacks nvidia-pytriton "
                                 f"for Python {probe['version']}; run `make setup`")

    backend = run_dir / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    links = {f: dist / "backends" / "python" / f for f in _BACKEND_FILES}
    links["triton_python_backend_stub"] = stub
    for name, target in links.items():
        (backend / name).unlink(missing_ok=True)
        (backend / name).symlink_to(target.resolve())

    env = _clean_env()
    env["PATH"] = os.pathsep.join([str(triton_env / "bin"), env.get("PATH", "")])
    libs = [probe["libdir"], str(Path(probe["purelib"]) / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return [str(binary), f"--backend-directory={backend.parent}"], env


def _read_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RECORD).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _alive(pid: int) -> bool:
    """True while `pid` is a live tritonserver (not a zombie, not a reused pid)."""
    try:  # reap it if it is our child, or its zombie would look alive
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie's cmdline is empty; another program may have the pid now
        return b"tritonserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _ready(http_port: int, timeout: float = 1.0) -> bool:
    # No proxy: a configured HTTP proxy must not answer for localhost.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _check_ports(ports: dict[str, int]) -> None:
    if len(set(ports.values())) != len(ports):
        raise HistoseekError(f"Triton's ports must differ, got {ports}")
    for what, port in ports.items():
        with socket.socket() as s:
            # SO_REUSEADDR as Triton uses it: a port in TIME_WAIT is free, a listening one is not.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError as exc:
                raise HistoseekError(
                    f"{what} port {port} is already in use ({exc.strerror}); choose another "
                    f"with --{what}-port, or stop what listens there (`histoseek triton status`)"
                ) from None


def _log_errors(log: Path, limit: int = 20) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    errors = [
        line[:600] for line in lines
        if (line.startswith("E") and line[1:5].isdigit() or line.startswith("error:"))
        and not any(noise in line for noise in _NOISE)
    ]
    return "\n".join((errors or lines)[-limit:])


def start(
    repo: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    run_dir: Path = Path("runs/triton"),
    triton_env: Path | None = None,
    timeout: float = 120,
) -> TritonInfo:
    """Start Triton on `repo` in the background and wait until all its models are ready."""
    repo, run_dir = Path(repo).resolve(), Path(run_dir).resolve()
    if not any(repo.glob("*/config.pbtxt")):
        raise HistoseekError(f"no models in {repo} (no <model>/config.pbtxt); "
                             "export one with `histoseek export`")
    record = _read_record(run_dir)
    if record and _alive(record["pid"]):
        raise HistoseekError(
            f"Triton already runs from {run_dir} (pid {record['pid']}, HTTP port "
            f"{record['http_port']}); stop it first with `histoseek triton stop`"
        )
    _check_ports({"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    command, env = _prepare(triton_env or default_triton_env(), run_dir)
    command += [
        f"--model-repository={repo}",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--disable-auto-complete-config",  # our configs are complete; skips a stub launch
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--exit-timeout-secs=10",
        # Each server's python-backend shared memory gets its own names, so that two
        # servers on one machine (tests, benchmarks) do not collide in /dev/shm.
        f"--backend-config=python,shm-region-prefix-name=histoseek_{os.getpid()}_{time.time_ns()}",
    ]
    log = run_dir / LOG
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, cwd=run_dir, start_new_session=True,  # own process group: outlives a Ctrl-C
        )
    info = TritonInfo(
        process.pid, http_port, grpc_port, metrics_port, str(repo), str(run_dir), str(log)
    )
    write_json(run_dir / RECORD, asdict(info))

    deadline = time.monotonic() + timeout
    while not _ready(http_port):
        if process.poll() is not None:
            (run_dir / RECORD).unlink(missing_ok=True)
            raise HistoseekError(
                f"Triton exited (code {process.returncode}) while starting; from {log}:\n"
                f"{_log_errors(log)}\nFix the model repository {repo} (re-export with "
                "`histoseek export`) or the environment (`make setup`), then start again."
            )
        if time.monotonic() > deadline:
            stop(run_dir)
            raise HistoseekError(
                f"Triton was not ready after {timeout:.0f}s; stopped it. Last log lines "
                f"({log}):\n{_log_errors(log)}\nLarge models load slowly: raise the timeout."
            )
        time.sleep(0.2)
    return info


def stop(run_dir: Path = Path("runs/triton"), timeout: float = 30) -> bool:
    """Stop the Triton recorded in `run_dir`; False when none was running."""
    record = _read_record(run_dir)
    if record is None:
        return False
    pid, was_alive = record["pid"], _alive(record["pid"])
    if was_alive:
        os.kill(pid, signal.SIGTERM)  # lets Triton finish in-flight requests and unload
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # SIGKILL whatever is left of its process group: the server itself if it ignored
        # SIGTERM for `timeout`, and any python-backend stub that outlived it.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while _alive(pid):
            time.sleep(0.05)
    (Path(run_dir) / RECORD).unlink(missing_ok=True)
    return was_alive


def status(run_dir: Path = Path("runs/triton")) -> dict:
    """The recorded server (pid, ports, repo, log) with whether it runs and is ready."""
    record = _read_record(run_dir)
    if record is None:
        return {"running": False, "ready": False, "run_dir": str(run_dir)}
    running = _alive(record["pid"])
    return {**record, "running": running, "ready": running and _ready(record["http_port"])}
