"""Whole slides through OpenSlide: synthetic pyramids, level choice, tissue masks, mosaics, prepare.

The slides are the project's own (training/data/synthetic_slides.py), small (2048 px at
0.5 µm/px, 3 levels) and opened by OpenSlide exactly as a scanner's files are.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoseek.dataset import read_dataset, read_slides_table, write_manifest
from histoseek.errors import HistoseekError
from histoseek.slides.mosaic import select_mosaic
from training.data.prepare_slides import list_slides, prepare_slides
from histoseek.slides.plan import plan_slide
from histoseek.slides.reader import Slide, SlideError, mpp_for
from training.data.synthetic_slides import CELL, make_slide, slide_spec, synthesize_slides
from histoseek.slides.tissue_mask import MASK_MPP, tissue_mask

SIZE = 2048


@pytest.fixture(scope="module")
def slides_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slides") / "slides"
    synthesize_slides(out, 4, classes=4, size=SIZE, seed=3)
    return out


def _truth(index: int):
    label, other, seed = slide_spec(index, 4, 3)
    return make_slide(label, other, SIZE, SIZE, 0.5, seed)


def _path(slides_dir: Path, index: int) -> Path:
    return slides_dir / _truth(index).label / f"slide_{index:04d}.tiff"


def test_openslide_reads_the_synthetic_pyramid(slides_dir):
    with Slide(_path(slides_dir, 0)) as slide:
        assert slide._slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_dimensions == ((2048, 2048), (512, 512), (128, 128))
        assert slide.level_downsamples == pytest.approx((1, 4, 16))


def test_level_follows_the_requested_resolution(slides_dir):
    with Slide(_path(slides_dir, 0)) as slide:
        assert slide.level_for(0.5) == 0 and slide.level_for(1.0) == 0
        assert slide.level_for(2.0) == 1 and slide.level_for(3.9) == 1 and slide.level_for(8.0) == 2
        reading = slide.tiling(64, 2.0)  # 64 px at 2 µm/px: 256 level-0 px, read as 64 px of level 1
        assert (reading.level, reading.read_px, reading.footprint) == (1, 64, 256)
        reading = slide.tiling(128, 1.0)  # between levels: read sharper, then reduce
        assert (reading.level, reading.read_px, reading.footprint) == (0, 256, 256)
        assert slide.read_tile(0, 0, 128, reading).shape == (128, 128, 3)
        with pytest.raises(SlideError, match="coarser --mpp"):
            slide.tiling(128, 0.25)
    assert mpp_for(None, 20) == 0.5 and mpp_for(0.25, None) == 0.25
    with pytest.raises(HistoseekError, match="either --mpp"):
        mpp_for(None, None)


def test_coordinates_map_back_to_the_drawn_pixels(slides_dir):
    truth = _truth(1)
    with Slide(_path(slides_dir, 1)) as slide:
        for x, y in [(0, 0), (640, 384), (1920, 1920)]:
            assert np.array_equal(slide.read(x, y, 0, (128, 128)), truth.render(1, x, y, 128, 128))
        # A level-1 read is addressed in level-0 px too.
        assert np.array_equal(slide.read(1024, 512, 1, (64, 64)), truth.render(4, 256, 128, 64, 64))


@pytest.mark.parametrize("index", range(4))
def test_tissue_mask_matches_the_drawn_regions(slides_dir, index):
    with Slide(_path(slides_dir, index)) as slide:
        overview, scale = slide.level_at(MASK_MPP)
        mask = tissue_mask(overview, slide.mpp * scale)
    truth = _truth(index).tissue(int(scale))
    assert mask.shape == truth.shape
    union = (mask | truth).sum()
    assert (mask & truth).sum() / union > 0.97  # intersection over union
    assert 0.1 < truth.mean() < 0.7


def test_tissue_mask_of_empty_glass_is_empty():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(241, 2, (128, 128, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass, 16.0).any()
    speck = glass.copy()
    speck[60:62, 60:62] = (120, 40, 140)  # dust: 32 µm wide
    assert not tissue_mask(speck, 16.0).any()


def test_mosaic_takes_a_share_of_every_colour_and_region():
    rng = np.random.default_rng(0)
    positions = rng.uniform(0, 10_000, (1000, 2))
    colours = np.where(np.arange(1000)[:, None] < 800, [200, 120, 180], [230, 170, 190]) + rng.normal(0, 2, (1000, 3))
    chosen = select_mosaic(colours, positions, colour_clusters=2, share=0.05, minimum=16)
    assert len(chosen) == 50 and len(set(chosen.tolist())) == 50
    assert (chosen >= 800).sum() == 10  # 5 % of each colour cluster
    assert np.array_equal(chosen, select_mosaic(colours, positions, colour_clusters=2))  # deterministic
    # Spread over the slide: every quarter of it has mosaic tiles.
    quarters = {(int(x // 5000), int(y // 5000)) for x, y in positions[chosen]}
    assert len(quarters) == 4
    assert len(select_mosaic(colours[:100], positions[:100], minimum=16)) >= 16
    assert np.array_equal(select_mosaic(colours[:10], positions[:10], minimum=16), np.arange(10))


def test_plan_keeps_tiles_inside_the_tissue(slides_dir):
    truth = _truth(2)
    with Slide(_path(slides_dir, 2)) as slide:
        plan = plan_slide(slide, 128, 0.5)
    assert len(plan.positions) > 20 and 16 <= len(plan.mosaic) < len(plan.positions)
    for x, y in plan.positions.tolist():
        cells = truth.class_map[y // CELL:(y + 128) // CELL, x // CELL:(x + 128) // CELL]
        assert (cells > 0).mean() >= 0.4
    # Every grid tile that lies entirely on drawn tissue is planned.
    full = {(x, y) for y in range(0, SIZE, 128) for x in range(0, SIZE, 128)
            if (truth.class_map[y // CELL:(y + 128) // CELL, x // CELL:(x + 128) // CELL] > 0).all()}
    assert full <= set(map(tuple, plan.positions.tolist()))


def test_prepare_slides_writes_tiles_manifest_and_slide_table(slides_dir, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(slides_dir, source)
    (source / "tumour" / "truncated.tiff").write_bytes(_path(slides_dir, 0).read_bytes()[:200_000])
    (source / "tumour" / "no_resolution.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    report = prepare_slides(source, tmp_path / "out", tile=128, mpp=0.5)
    assert report.slides_read == 4 and len(report.skipped) == 2
    dataset = read_dataset(tmp_path / "out")
    assert len(dataset) == report.tiles_written and sum(i.mosaic for i in dataset.items) == report.mosaic_tiles
    slides = read_slides_table(tmp_path / "out")
    assert sorted(row["slide"] for row in slides) == [f"slide_{i:04d}" for i in range(4)]
    for row in slides:
        items = [i for i in dataset.items if i.group == row["slide"]]
        assert int(row["tiles"]) == len(items) and all(i.mpp == 0.5 and i.label == row["label"] for i in items)
        assert Path(row["file"]).is_file()
    # A written tile is the slide's pixels at its level-0 x, y.
    item = dataset.items[len(dataset.items) // 2]
    with Slide(source / item.source) as slide:
        assert np.array_equal(np.asarray(Image.open(dataset.absolute(item))), slide.read(item.x, item.y, 0, (128, 128)))


def test_prepare_slides_with_a_labels_file_and_a_coarser_resolution(slides_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label"])
        for index in range(2):
            shutil.copy(_path(slides_dir, index), flat / f"case{index}.tiff")
            writer.writerow([f"case{index}", f"dx{index}"])
    assert [s.label for s in list_slides(flat, tmp_path / "labels.csv")] == ["dx0", "dx1"]
    report = prepare_slides(flat, tmp_path / "out", tile=64, mpp=2.0, labels_csv=tmp_path / "labels.csv",
                            mosaic_minimum=4)
    assert report.slides_read == 2
    items = read_dataset(tmp_path / "out").items
    assert {i.group for i in items} == {"case0", "case1"} and all(i.x % 256 == 0 for i in items)
    with pytest.raises(HistoseekError, match="no slides found"):
        prepare_slides(flat, tmp_path / "none", tile=64, mpp=2.0)


def test_slide_without_resolution_needs_slide_mpp(tmp_path):
    import tifffile

    path = tmp_path / "plain.tiff"
    rgb = np.full((512, 512, 3), 240, np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", metadata=None)
    with pytest.raises(SlideError, match="--slide-mpp"):
        Slide(path)
    with Slide(path, slide_mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_old_manifests_read_and_plain_manifests_keep_their_columns(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "manifest.csv").write_text("path,label,group,split,x,y,source\na.png,t,g,,3,4,s\n")
    (item,) = read_dataset(tmp_path).items
    assert (item.x, item.y, item.mpp, item.mosaic) == (3, 4, 0.0, 0)
    write_manifest(tmp_path, [item])
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0] == "path,label,group,split,x,y,source"


def test_cli_synthesises_and_prepares_slides(tmp_path, capsys):
    from histoseek_cli.main import main

    main(["data", "synth", "--slides", "2", "--classes", "2", "--slide-size", "1024", "--out", str(tmp_path / "s")])
    assert "wrote 2 slides" in capsys.readouterr().out
    main(["data", "prepare", "--format", "slides", "--src", str(tmp_path / "s"), "--out", str(tmp_path / "t"),
          "--tile", "64", "--magnification", "10", "--mosaic-min", "4"])
    assert "2 slides read" in capsys.readouterr().out
    assert {item.mpp for item in read_dataset(tmp_path / "t").items} == {1.0}
    with pytest.raises(SystemExit):  # --tile is required for slides
        main(["data", "prepare", "--format", "slides", "--src", str(tmp_path / "s"), "--out", str(tmp_path / "u"),
              "--mpp", "1"])
    assert "needs --tile" in capsys.readouterr().err
