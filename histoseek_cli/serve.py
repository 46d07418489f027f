"""`histoseek serve` (the search API) and `histoseek demo` (the Gradio demo in front of it)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from histoseek.errors import HistoseekError
from histoseek_cli.options import add_list, positive, triton_arguments
from server.api.settings import API_KEYS_ENV, Settings

MIN_KEY_LENGTH = 16


def api_keys(key_file: Path | None) -> tuple[str, ...]:
    """Keys from --api-key-file (one a line, `#` comments) or else $HISTOSEEK_API_KEYS (comma separated)."""
    if key_file is not None:
        try:
            lines = key_file.read_text().splitlines()
        except OSError as exc:
            raise HistoseekError(f"cannot read the API key file {key_file}: {exc.strerror}") from exc
        keys, where = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")], key_file
        if not keys:
            raise HistoseekError(f"the API key file {key_file} holds no key (one key a line)")
    else:
        keys, where = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()], API_KEYS_ENV
    for key in keys:  # the message never shows the key itself
        if len(key) < MIN_KEY_LENGTH or not key.isprintable() or any(c.isspace() for c in key):
            raise HistoseekError(f"an API key in {where} is shorter than {MIN_KEY_LENGTH} characters or holds spaces "
                                 "or control characters; make one with: python -c \"import secrets; "
                                 "print(secrets.token_urlsafe(32))\"")
    return tuple(keys)


def serve_command(args: argparse.Namespace) -> None:
    from server.api.app import serve

    budget = {} if args.max_decode_mb is None else {"max_decode_bytes": int(args.max_decode_mb * 1e6)}
    settings = Settings(max_upload_bytes=int(args.max_upload_mb * 1e6), max_pixels=args.max_pixels, max_k=args.max_k,
                        request_timeout_s=args.request_timeout, api_keys=api_keys(args.api_key_file),
                        protect_search=args.protect_search, cors_origins=tuple(args.cors_origin),
                        tokenizer_dirs=tuple(str(d) for d in args.tokenizer_dir),
                        max_queued_slides=args.max_queued_slides, slide_start_rate=args.slide_start_rate, **budget)
    serve(args.indexes, args.triton_url, args.protocol, host=args.host, port=args.port, settings=settings)


def demo_command(args: argparse.Namespace) -> None:
    from demo.app import launch

    keys = api_keys(args.api_key_file)
    launch(args.api_url, host=args.host, port=args.port, api_key=keys[0] if keys else None)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the search API (FastAPI) over every index folder in --indexes")
    p.add_argument("--indexes", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    triton_arguments(p)
    p.add_argument("--max-upload-mb", type=positive(float), default=Settings.max_upload_bytes / 1e6,
                   help="largest image upload in MB (default: %(default)s)")
    p.add_argument("--max-pixels", type=positive(int), default=Settings.max_pixels,
                   help="largest image (width x height) decoded; bigger ones must be tiled first "
                        "(default: %(default)s)")
    p.add_argument("--max-k", type=positive(int), default=Settings.max_k,
                   help="most results one search may ask for (default: %(default)s)")
    p.add_argument("--max-decode-mb", type=positive(float), default=None,
                   help="decode memory of all uploads in flight together, in MB; uploads that do not fit wait "
                        "a few seconds, then get 503 with Retry-After (default: a quarter of the machine's memory)")
    p.add_argument("--request-timeout", type=positive(float), default=Settings.request_timeout_s,
                   help="seconds a search or an add may take to decode, embed and search; then it is stopped "
                        "and answered 503 (default: %(default)s)")
    p.add_argument("--max-queued-slides", type=positive(int), default=Settings.max_queued_slides,
                   help="slide searches admitted at once (queued or running); more get 503 with Retry-After at "
                        "once, as do those the queue could not finish before --request-timeout (default: %(default)s)")
    p.add_argument("--slide-start-rate", type=positive(float), default=Settings.slide_start_rate,
                   help="tiles per second slide searches are admitted against until the server has measured its "
                        "own rate (default: %(default)s)")
    p.add_argument("--api-key-file", type=Path,
                   help=f"API keys, one a line: adding and removing items then needs one (default: ${API_KEYS_ENV}, "
                        "comma separated; neither: no keys)")
    p.add_argument("--protect-search", action="store_true", help="searches and other reads need a key too")
    add_list(p, "--cors-origin", default=[], metavar="URL",
             help="browser origins allowed to call the API, e.g. https://viewer.example.org (default: none, CORS off)")
    add_list(p, "--tokenizer-dir", type=Path, default=[], metavar="DIR",
             help="folders with text towers' tokenizer files, for text search (e.g. model_repository/conch_text/1); "
                  "CLIP's vocabulary (clip, PLIP, QuiltNet) ships with open_clip and needs none")
    p.set_defaults(func=serve_command)

    p = sub.add_parser("demo", help="the Gradio demo in front of a running search API")
    p.add_argument("--api-url", default="http://127.0.0.1:8080")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key-file", type=Path,
                   help=f"send the first key of this file to the API (default: the first of ${API_KEYS_ENV})")
    p.set_defaults(func=demo_command)
