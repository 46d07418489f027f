"""`histoseek data synth|prepare`: make or prepare a dataset folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from histoseek.errors import HistoseekError


def synth(args: argparse.Namespace) -> None:
    if args.slides is not None:
        from training.data.synthetic_slides import synthesize_slides

        paths = synthesize_slides(args.out, args.slides, classes=args.classes, size=args.slide_size,
                                  mpp=args.slide_mpp, seed=args.seed)
        print(f"wrote {len(paths)} slides ({args.slide_size}x{args.slide_size} px at {args.slide_mpp} µm/px) "
              f"and labels.csv to {args.out}")
        return
    from training.data.synthetic import synthesize

    dataset = synthesize(args.out, classes=args.classes, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {len(dataset)} tiles in {len(dataset.labels)} classes to {args.out}")


def prepare(args: argparse.Namespace) -> None:
    if args.format == "slides":
        from histoseek.slides.reader import mpp_for
        from training.data.prepare_slides import prepare_slides

        if args.tile is None:
            raise HistoseekError("--format slides needs --tile (px of a tile at the target --mpp), e.g. --tile 224")
        report = prepare_slides(args.src, args.out, tile=args.tile, mpp=mpp_for(args.mpp, args.magnification),
                                labels_csv=args.labels, slide_mpp=args.slide_mpp, mask_fraction=args.mask_fraction,
                                min_tissue=args.min_tissue, mosaic_share=args.mosaic_share,
                                mosaic_minimum=args.mosaic_min, stain_norm=args.stain_norm)
        print(report.summary())
        return
    from training.data.prepare import prepare_dataset

    report = prepare_dataset(args.format, args.src, args.out, tile=args.tile, stride=args.stride, resize=args.resize,
                             min_tissue=args.min_tissue, stain_norm=args.stain_norm)
    print(report.summary())


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="make or prepare a dataset folder").add_subparsers(dest="action", required=True)
    p = data.add_parser("synth", help="procedural H&E-like tiles (the project's own demo/test data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, help="write this many whole slides (pyramidal TIFFs, one label each) "
                                             "instead of tiles; --classes labels them")
    p.add_argument("--slide-size", type=int, default=2048, help="level-0 side of a synthetic slide in px")
    p.add_argument("--slide-mpp", type=float, default=0.5, help="µm per level-0 px of a synthetic slide")
    p.set_defaults(func=synth)
    p = data.add_parser("prepare", help="tile and index a real dataset (BACH, BRACS, CRC, folder per class)")
    p.add_argument("--format", choices=["folder", "bach", "bracs", "crc", "slides"], required=True,
                   help="slides: whole-slide images (OpenSlide) in <src>/<label>/ or anywhere with --labels")
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, help="tile size in pixels (default: whole images)")
    p.add_argument("--stride", type=int, help="tile stride (default: the tile size)")
    p.add_argument("--resize", type=int, help="rescale source images before tiling (see README)")
    p.add_argument("--min-tissue", type=float, default=0.0, help="drop tiles with less tissue than this fraction")
    p.add_argument("--stain-norm", type=Path, help="reference image for Macenko stain normalisation")
    slides = p.add_argument_group("whole slides (--format slides)")
    slides.add_argument("--mpp", type=float, help="µm per px of the tiles, e.g. 0.5 (~20x)")
    slides.add_argument("--magnification", type=float, help="instead of --mpp: objective, e.g. 20 (= 0.5 µm/px)")
    slides.add_argument("--slide-mpp", type=float, help="µm per level-0 px, for slides that do not record it")
    slides.add_argument("--labels", type=Path, help="CSV with columns slide,label (default: the slide's folder)")
    slides.add_argument("--mask-fraction", type=float, default=0.5,
                        help="share of a tile the tissue mask must cover (default: %(default)s)")
    slides.add_argument("--mosaic-share", type=float, default=0.05,
                        help="share of each colour cluster's tiles in the mosaic (default: %(default)s)")
    slides.add_argument("--mosaic-min", type=int, default=16, help="fewest mosaic tiles per slide (default: %(default)s)")
    p.set_defaults(func=prepare)
