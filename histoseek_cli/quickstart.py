"""`histoseek quickstart` (what `make demo` runs): the whole system on real tissue.

240 real colorectal H&E tiles shipped with the project (demo/collection/kather2016, CC BY
4.0) -> two minutes (at least 50 steps) of fine-tuning the `cpu` preset of `dml` (metric learning on the
collection's diagnoses, as a pathologist's labelled archive allows) from its ImageNet start ->
ONNX export -> Triton -> FAISS index -> search API -> Gradio demo; prints the URLs and
stays up until Ctrl-C, which stops everything it started. Every stage is the documented `histoseek` command
run as a subprocess, so the demo exercises exactly what the README tells users to run.
Stages whose output already exists are skipped, so a second `make demo` is quick.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from histoseek.errors import HistoseekError
from histoseek.processes import histoseek_command, wait_http
from training.recipes import DEMO_COLLECTION, QUICKSTART_EPOCHS, QUICKSTART_MIN_STEPS, QUICKSTART_MINUTES

log = logging.getLogger(__name__)




@dataclass
class QuickstartConfig:
    workdir: Path
    encoder: str = "dml"
    train_minutes: float = QUICKSTART_MINUTES
    min_steps: int = QUICKSTART_MIN_STEPS
    collection: Path = DEMO_COLLECTION
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    api_port: int = 8080
    demo_port: int = 7860


def _run(*args: object) -> None:
    log.info("$ histoseek %s", " ".join(map(str, args)))
    if subprocess.run(histoseek_command(*args)).returncode != 0:
        raise HistoseekError(f"`histoseek {' '.join(map(str, args))}` failed (see above)")


def _stop(process: subprocess.Popen, what: str) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in 15 s; killing it", what)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _build_stages(cfg: QuickstartConfig) -> dict[str, Path]:
    w = cfg.workdir
    paths = {"data": Path(cfg.collection), "checkpoint": w / "checkpoints" / cfg.encoder,
             "repo": w / "model_repository", "indexes": w / "indexes", "triton_run": w / "run" / "triton"}
    if not paths["data"].is_dir():
        raise HistoseekError(f"the demo collection {paths['data']} is missing; pass --collection DIR "
                             "(a folder per class of H&E tiles)")
    if not (paths["checkpoint"] / "weights.safetensors").is_file():
        # The clock ends training, but never before the recipe's minimum steps (a slow machine
        # takes longer instead of serving a weaker model); the log says how long that is here.
        _run("train", "--encoder", cfg.encoder, "--data", paths["data"], "--out", paths["checkpoint"],
             "--max-minutes", cfg.train_minutes, "--min-steps", cfg.min_steps, "--epochs", QUICKSTART_EPOCHS)
    weights_time = (paths["checkpoint"] / "weights.safetensors").stat().st_mtime
    versions = sorted(p for p in (paths["repo"] / cfg.encoder).glob("[0-9]*/model.onnx"))
    if not versions or max(p.stat().st_mtime for p in versions) < weights_time:
        _run("export", "--checkpoint", paths["checkpoint"], "--repo", paths["repo"])
    return paths


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up exactly like Ctrl-C


def run_quickstart(cfg: QuickstartConfig) -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C must stop everything even when started from a shell that ignores SIGINT in
    # background jobs (Python then installs no KeyboardInterrupt handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    paths = _build_stages(cfg)
    triton_url = f"localhost:{cfg.triton_grpc_port}"
    _run("triton", "start", "--repo", paths["repo"], "--run-dir", paths["triton_run"],
         "--http-port", cfg.triton_http_port, "--grpc-port", cfg.triton_grpc_port,
         "--metrics-port", cfg.triton_metrics_port)
    processes: list[tuple[subprocess.Popen, str]] = []
    try:
        index = paths["indexes"] / Path(cfg.collection).name
        manifest = index / "manifest.json"
        if not manifest.is_file() or json.loads(manifest.read_text()).get("count", 0) == 0 or \
                manifest.stat().st_mtime < (paths["checkpoint"] / "weights.safetensors").stat().st_mtime:
            _run("index", "build", "--encoder", cfg.encoder, "--data", paths["data"], "--out", index,
                 "--triton-url", triton_url)
        api_url = f"http://127.0.0.1:{cfg.api_port}"
        # Own sessions: Ctrl-C reaches only this process, which then stops them in order.
        api = subprocess.Popen(histoseek_command("serve", "--indexes", paths["indexes"], "--triton-url", triton_url,
                                          "--port", cfg.api_port), start_new_session=True)
        processes.append((api, "search API"))
        wait_http(f"{api_url}/readyz", "search API", api)
        demo = subprocess.Popen(histoseek_command("demo", "--api-url", api_url, "--port", cfg.demo_port),
                                start_new_session=True)
        processes.append((demo, "demo"))
        demo_url = f"http://127.0.0.1:{cfg.demo_port}"
        wait_http(demo_url, "demo", demo)
        print(f"\nHistoSeek is ready after {time.monotonic() - started:.0f} s\n"
              f"  demo (browser):   {demo_url}\n"
              f"  search API:       {api_url}  (OpenAPI docs: {api_url}/docs)\n"
              f"  Triton:           HTTP localhost:{cfg.triton_http_port}, gRPC {triton_url}\n"
              f"Press Ctrl-C to stop everything.", flush=True)
        while all(p.poll() is None for p, _ in processes):
            time.sleep(0.5)
        dead = next(what for p, what in processes if p.poll() is not None)
        raise HistoseekError(f"the {dead} stopped unexpectedly (see its output above)")
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    finally:
        for process, what in reversed(processes):
            _stop(process, what)
        subprocess.run(histoseek_command("triton", "stop", "--run-dir", paths["triton_run"]))


def run(args: argparse.Namespace) -> None:
    run_quickstart(QuickstartConfig(
        workdir=args.workdir, encoder=args.encoder, train_minutes=args.train_minutes, min_steps=args.min_steps,
        **({"collection": args.collection} if args.collection else {}),
        triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
        triton_metrics_port=args.triton_metrics_port, api_port=args.api_port, demo_port=args.demo_port,
    ))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="the whole system on real H&E tiles that ship with HistoSeek, up until "
                                          "Ctrl-C (make demo)")
    p.add_argument("--workdir", type=Path, default=Path("work/demo"))
    p.add_argument("--encoder", default="dml")
    p.add_argument("--train-minutes", type=float, default=QUICKSTART_MINUTES,
                   help="training time on a fast machine; a slower one trains --min-steps however long they "
                        "take (default: %(default)s)")
    p.add_argument("--min-steps", type=int, default=QUICKSTART_MIN_STEPS,
                   help="fewest training steps, whatever the clock says (default: %(default)s)")
    p.add_argument("--collection", type=Path, help="the tiles to index, a folder per class (default: the real "
                                                   "colorectal H&E tiles in demo/collection/kather2016)")
    p.add_argument("--triton-http-port", type=int, default=8000)
    p.add_argument("--triton-grpc-port", type=int, default=8001)
    p.add_argument("--triton-metrics-port", type=int, default=8002)
    p.add_argument("--api-port", type=int, default=8080)
    p.add_argument("--demo-port", type=int, default=7860)
    p.set_defaults(func=run)
