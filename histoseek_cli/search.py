"""`histoseek search image|text|slide`: search an index from the command line."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from histoseek_cli.options import add_list, triton_arguments


def _where(args: argparse.Namespace):
    from server.index.filters import from_lists

    return from_lists(labels=args.label, exclude_labels=args.exclude_label, groups=args.group,
                      exclude_groups=args.exclude_group, sources=args.source, exclude_sources=args.exclude_source)


def image(args: argparse.Namespace) -> None:
    from server.search_command import search_image_command

    result = search_image_command(args.index, args.image, k=args.k, where=_where(args), triton_url=args.triton_url,
                                  protocol=args.protocol, relevant=args.relevant, not_relevant=args.not_relevant)
    _print_hits(result, args.json)


def text(args: argparse.Namespace) -> None:
    from server.text_search import search_text_command

    result = search_text_command(args.index, args.text, k=args.k, where=_where(args), triton_url=args.triton_url,
                                 protocol=args.protocol, tokenizer_dirs=args.tokenizer_dir)
    _print_hits(result, args.json)


def _print_hits(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"vote {result['vote']['label'] or '-'} ({result['vote']['share']:.0%}) of {len(result['results'])} results")
    for r in result["results"]:
        print(f"{r['rank']:3d}. id {r['id']}  {r['label']}  score {r['score']:.4f}  group {r['group']}  {r['source']}")


def slide(args: argparse.Namespace) -> None:
    from server.slides.search import search_slide_command

    result = search_slide_command(args.index, slide=args.slide, slide_id=args.slide_id, k=args.k,
                                  slide_mpp=args.slide_mpp, triton_url=args.triton_url, protocol=args.protocol)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"query {result['query']}: {result['query_tiles']} mosaic tiles; "
          f"vote {result['vote']['label'] or '-'} ({result['vote']['share']:.0%})")
    for r in result["results"]:
        best = r["matches"][0] if r["matches"] else None
        where = f"best pair: query ({best['query_x']}, {best['query_y']}) ~ ({best['x']}, {best['y']})" if best else ""
        print(f"{r['rank']:3d}. {r['slide']}  {r['label']}  score {r['score']:.4f}  {where}")


def register(sub: argparse._SubParsersAction) -> None:
    search = sub.add_parser("search", help="search an index from the command line").add_subparsers(
        dest="action", required=True)
    p = search.add_parser("image", help="the most similar items of an index to one image, optionally filtered")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("-k", type=int, default=10)
    _filter_arguments(p)
    refine = p.add_argument_group("refine (search again with results of an earlier search marked; nothing is kept "
                                  "between searches)")
    add_list(refine, "--relevant", type=int, metavar="ID", help="ids of results like what you are looking for")
    add_list(refine, "--not-relevant", type=int, metavar="ID", help="ids of results unlike it")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    triton_arguments(p)
    p.set_defaults(func=image)

    p = search.add_parser("text", help="the items of an index nearest a text (encoders with a text tower: clip, "
                                       "conch, plip, quiltnet), optionally filtered")
    p.add_argument("text", help="what to find, e.g. 'a histopathology image of tubular adenoma' (put it "
                                "before list options such as --label, which take every word after them)")
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("-k", type=int, default=10)
    _filter_arguments(p)
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_list(p, "--tokenizer-dir", type=Path, default=[], metavar="DIR",
             help="folders with the text tower's tokenizer files, if not CLIP's (which ships with open_clip)")
    triton_arguments(p)
    p.set_defaults(func=text)

    p = search.add_parser("slide", help="rank an index's slides against a query slide (Yottixel mosaic)")
    p.add_argument("--index", type=Path, required=True)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--slide", type=Path, help="a slide file (its mosaic is the query)")
    query.add_argument("--slide-id", help="a slide of the index (never among its own results)")
    p.add_argument("-k", "--k", type=int, default=5, help="slides returned (default: %(default)s)")
    p.add_argument("--slide-mpp", type=float, help="µm per level-0 px, for a slide that does not record it")
    p.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    triton_arguments(p)
    p.set_defaults(func=slide)


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    filters = p.add_argument_group("filters (applied inside the search, so k results come back whenever k items "
                                   "match)")
    for name, meaning in (("label", "diagnoses"), ("group", "slides or patients"), ("source", "source files")):
        add_list(filters, f"--{name}", metavar=name.upper(), help=f"only items of these {meaning}")
        add_list(filters, f"--exclude-{name}", metavar=name.upper(), help=f"no items of these {meaning}")
