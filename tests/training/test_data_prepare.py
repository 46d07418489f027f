"""`data prepare`: each public layout, tiling, background filtering, stain normalisation,
broken files, and the written folder, on small trees fabricated here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torchstain
from PIL import Image

from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from training.data import bach, bracs, crc, folders
from training.data.prepare import prepare_dataset
from training.data.synthetic import Stain, render_tile, sample_stain
from training.data.tiling import tile_positions, tissue_fraction

WIDTH, HEIGHT = 300, 200


def he_image(seed: int = 0, kind: str = "tumour", stain: Stain | None = None) -> np.ndarray:
    """A 300x200 H&E-like RGB image."""
    return render_tile(kind, WIDTH, np.random.default_rng(seed), stain)[:HEIGHT]


def save(path: Path, rgb: np.ndarray | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(he_image(seed) if rgb is None else rgb).save(path)
    return path


def by_source(dataset) -> dict[str, object]:
    return {item.source: item for item in dataset.items}


def records_by_name(records) -> dict[str, folders.SourceRecord]:
    return {r.path.name: r for r in records}


# --- layouts --------------------------------------------------------------------------------


def test_folder_layout_whole_images(tmp_path):
    src = tmp_path / "src"
    save(src / "tumour" / "a.png")
    save(src / "stroma" / "deep" / "b.jpg", seed=1)
    save(src / "stroma" / "c.tif", seed=2)
    (src / "stroma" / "notes.txt").write_text("not an image")

    report = prepare_dataset("folder", src, tmp_path / "out")

    dataset = read_dataset(tmp_path / "out")
    items = by_source(dataset)
    assert sorted(items) == ["stroma/c.tif", "stroma/deep/b.jpg", "tumour/a.png"]
    assert items["stroma/deep/b.jpg"].label == "stroma"
    assert {i.group for i in dataset.items} == set(items)  # every image its own group
    assert {i.split for i in dataset.items} == {""}
    assert report.images_read == 3 and report.tiles_written == 3 and not report.skipped
    written = np.asarray(Image.open(dataset.absolute(items["tumour/a.png"])))
    assert np.array_equal(written, np.asarray(Image.open(src / "tumour" / "a.png")))


def test_folder_layout_keeps_split_and_separates_equal_names(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "val", "test"):
        save(src / split / "tumour" / "img.png")
        save(src / split / "stroma" / "img.png", seed=1)

    prepare_dataset("folder", src, tmp_path / "out")

    dataset = read_dataset(tmp_path / "out")
    assert len(dataset) == 6 and len({i.path for i in dataset.items}) == 6
    assert {(i.source, i.split, i.label) for i in dataset.items} == {
        (f"{s}/{c}/img.png", s, c) for s in ("train", "val", "test") for c in ("tumour", "stroma")
    }


def test_folder_layout_errors_say_what_was_expected(tmp_path):
    save(tmp_path / "mixed" / "train" / "tumour" / "a.png")
    save(tmp_path / "mixed" / "stroma" / "b.png")
    with pytest.raises(HistoseekError, match="mixes split folders"):
        folders.list_sources(tmp_path / "mixed")
    (tmp_path / "empty" / "tumour").mkdir(parents=True)
    with pytest.raises(HistoseekError, match="one folder per class"):
        folders.list_sources(tmp_path / "empty")


def test_bach_labels_from_ground_truth_csv(tmp_path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    for cls, name in [("Normal", "n001.tif"), ("Benign", "b001.tif"), ("InSitu", "is001.tif"),
                      ("Invasive", "iv001.tif"), ("Benign", "b002.tif")]:
        save(photos / cls / name)
    # The official CSV (no header) is the label source: it wins over the folder.
    (photos / "microscopy_ground_truth.csv").write_text(
        "n001.tif,Normal\nb001.tif,Invasive\nis001.tif,InSitu\niv001.tif,Invasive\n"
    )

    for src in (photos.parent, photos):  # the dataset root or its Photos/ folder
        records = records_by_name(bach.list_sources(src))
        assert {name: r.label for name, r in records.items()} == {
            "n001.tif": "Normal", "b001.tif": "Invasive", "is001.tif": "InSitu",
            "iv001.tif": "Invasive", "b002.tif": "Benign",  # not in the CSV: its folder
        }
        assert {r.split for r in records.values()} == {""}
        assert len({r.group for r in records.values()}) == 5

    prepare_dataset("bach", photos.parent, tmp_path / "out", tile=100)
    dataset = read_dataset(tmp_path / "out")
    assert {i.label for i in dataset.items if i.source == "Photos/Benign/b001.tif"} == {"Invasive"}
    assert len(dataset) == 5 * 6


def test_bach_wrong_layout(tmp_path):
    save(tmp_path / "src" / "tumour" / "a.png")
    with pytest.raises(HistoseekError, match=r"Photos/\{Normal,Benign,InSitu,Invasive\}"):
        bach.list_sources(tmp_path / "src")


def test_bracs_slide_groups_labels_and_official_split(tmp_path):
    src = tmp_path / "BRACS_RoI" / "latest_version"
    for rel in ["train/0_N/BRACS_1003_N_1.png", "train/0_N/BRACS_1003_N_2.png",
                "train/5_DCIS/BRACS_1003_DCIS_4.png", "train/5_DCIS/BRACS_1010_DCIS_1.png",
                "val/1_PB/BRACS_1020_PB_3.png", "test/6_IC/BRACS_1030_IC_1.png"]:
        save(src / rel)

    records = records_by_name(bracs.list_sources(src))

    assert {n: (r.label, r.group, r.split) for n, r in records.items()} == {
        "BRACS_1003_N_1.png": ("N", "BRACS_1003", "train"),
        "BRACS_1003_N_2.png": ("N", "BRACS_1003", "train"),
        "BRACS_1003_DCIS_4.png": ("DCIS", "BRACS_1003", "train"),
        "BRACS_1010_DCIS_1.png": ("DCIS", "BRACS_1010", "train"),
        "BRACS_1020_PB_3.png": ("PB", "BRACS_1020", "val"),
        "BRACS_1030_IC_1.png": ("IC", "BRACS_1030", "test"),
    }
    prepare_dataset("bracs", src, tmp_path / "out", tile=100, stride=100)
    dataset = read_dataset(tmp_path / "out")
    assert len(dataset) == 6 * 6
    assert {i.group for i in dataset.items if i.source.startswith("train/0_N/")} == {"BRACS_1003"}


def test_bracs_wrong_layout(tmp_path):
    save(tmp_path / "flat" / "N" / "BRACS_1003_N_1.png")
    with pytest.raises(HistoseekError, match=r"not a BRACS RoI folder.*<k>_<CLASS>"):
        bracs.list_sources(tmp_path / "flat")
    save(tmp_path / "badclass" / "train" / "N" / "BRACS_1003_N_1.png")
    with pytest.raises(HistoseekError, match="named <k>_<CLASS>"):
        bracs.list_sources(tmp_path / "badclass")


def test_crc_grades_with_and_without_fold_folders(tmp_path):
    flat = tmp_path / "flat"
    save(flat / "Normal" / "a.png")
    save(flat / "High" / "b.png")
    assert {(r.label, r.split, r.group) for r in crc.list_sources(flat)} == {
        ("Normal", "", "Normal/a.png"), ("High", "", "High/b.png")
    }

    folds = tmp_path / "folds"
    save(folds / "CRC_fold1" / "Low" / "a.png")
    save(folds / "CRC_fold1" / "Normal" / "b.png")
    save(folds / "CRC_fold2" / "Low" / "a.png")
    assert {(r.label, r.split, r.group) for r in crc.list_sources(folds)} == {
        ("Low", "CRC_fold1", "CRC_fold1/Low/a.png"), ("Normal", "CRC_fold1", "CRC_fold1/Normal/b.png"),
        ("Low", "CRC_fold2", "CRC_fold2/Low/a.png"),
    }

    (tmp_path / "nothing" / "Low").mkdir(parents=True)
    with pytest.raises(HistoseekError, match=r"<src>/<grade>/\*\.png"):
        crc.list_sources(tmp_path / "nothing")


# --- tiling, resizing, background -----------------------------------------------------------


def test_tile_counts_coordinates_and_pixels(tmp_path):
    src = tmp_path / "src"
    source = save(src / "tumour" / "a.png")

    prepare_dataset("folder", src, tmp_path / "out", tile=100)
    dataset = read_dataset(tmp_path / "out")
    assert sorted((i.x, i.y) for i in dataset.items) == [(x, y) for x in (0, 100, 200) for y in (0, 100)]
    original = np.asarray(Image.open(source))
    for item in dataset.items:
        tile = np.asarray(Image.open(dataset.absolute(item)))
        assert np.array_equal(tile, original[item.y : item.y + 100, item.x : item.x + 100])

    report = prepare_dataset("folder", src, tmp_path / "out", tile=100, stride=50)
    assert report.tiles_written == 5 * 3  # x in 0..200 step 50, y in 0..100 step 50
    assert tile_positions(WIDTH, HEIGHT, 128, 128) == [(0, 0), (128, 0)]  # edge strips left out


def test_resize_sets_the_shorter_side_and_keeps_source_coordinates(tmp_path):
    src = tmp_path / "src"
    save(src / "tumour" / "a.png")

    prepare_dataset("folder", src, tmp_path / "tiles", tile=100, resize=50)
    tiles = read_dataset(tmp_path / "tiles")
    assert {Image.open(tiles.absolute(i)).size for i in tiles.items} == {(50, 50)}
    assert max(i.x for i in tiles.items) == 200

    prepare_dataset("folder", src, tmp_path / "whole", resize=100)
    whole = read_dataset(tmp_path / "whole")
    assert Image.open(whole.absolute(whole.items[0])).size == (150, 100)


def test_background_tiles_are_dropped(tmp_path):
    image = he_image()
    image[:, :150] = 245  # glass on the left half: tiles at x=0 are empty, x=100 half empty
    src = tmp_path / "src"
    save(src / "tumour" / "a.png", image)
    assert tissue_fraction(image[:, :100]) == 0.0
    assert tissue_fraction(image[:, 200:]) > 0.9

    report = prepare_dataset("folder", src, tmp_path / "out", tile=100, min_tissue=0.6)

    assert report.tiles_dropped_background == 4 and report.tiles_written == 2
    assert {i.x for i in read_dataset(tmp_path / "out").items} == {200}
    with pytest.raises(HistoseekError, match="lower --min-tissue"):
        prepare_dataset("folder", src, tmp_path / "none", tile=100, min_tissue=1.0)
    assert not (tmp_path / "none").exists()


# --- stain normalisation --------------------------------------------------------------------


def _stain_vectors(rgb: np.ndarray) -> np.ndarray:
    """Macenko's estimate of an image's H and E optical-density vectors (columns)."""
    estimator = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    estimator.fit(rgb)
    return estimator.HERef


def _angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cosine = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return np.degrees(np.arccos(np.clip(cosine, -1, 1)))


def test_stain_normalisation_gives_tiles_the_reference_stains(tmp_path):
    reference = save(tmp_path / "reference.png", he_image(seed=5, stain=sample_stain(np.random.default_rng(100))))
    src = tmp_path / "src"
    for k in range(3):  # sources with their own, different stains
        save(src / "tumour" / f"{k}.png", he_image(seed=k, stain=sample_stain(np.random.default_rng(k))))
    part_blank = he_image(seed=9)
    part_blank[:, :100] = 250  # glass
    save(src / "stroma" / "part_blank.png", part_blank)

    plain = prepare_dataset("folder", src, tmp_path / "plain", tile=100)
    normed = prepare_dataset("folder", src, tmp_path / "normed", tile=100, stain_norm=reference)

    # The two glass-only tiles cannot be normalised: they are written as they are.
    assert normed.tiles_written == plain.tiles_written == 4 * 6
    assert normed.stain_norm_failed == 2
    reference_stains = _stain_vectors(np.asarray(Image.open(reference)))
    before, after = read_dataset(tmp_path / "plain"), read_dataset(tmp_path / "normed")
    angles_before, angles_after = [], []
    for a, b in zip(before.items, after.items):
        assert a.path == b.path
        tile_before, tile_after = (np.asarray(Image.open(d.absolute(i))) for d, i in ((before, a), (after, b)))
        if b.source == "stroma/part_blank.png" and b.x == 0:
            assert np.array_equal(tile_before, tile_after)
            continue
        assert np.abs(tile_before.astype(float) - tile_after).mean() > 1.0
        angles_before.append(_angles(_stain_vectors(tile_before), reference_stains))
        angles_after.append(_angles(_stain_vectors(tile_after), reference_stains))
    # Macenko's promise: the output's H and E vectors are the reference's (a few degrees
    # of re-estimation noise), whatever they were before.
    assert np.mean(angles_after) < 3.0 < np.mean(angles_before)
    assert np.mean(angles_after) < 0.5 * np.mean(angles_before)


def test_blank_stain_reference_is_refused(tmp_path):
    save(tmp_path / "src" / "tumour" / "a.png")
    blank = save(tmp_path / "blank.png", np.full((64, 64, 3), 250, np.uint8))
    with pytest.raises(HistoseekError, match="choose a reference image"):
        prepare_dataset("folder", tmp_path / "src", tmp_path / "out", stain_norm=blank)


# --- broken input and the output folder -----------------------------------------------------


def test_broken_files_are_reported_and_skipped(tmp_path):
    src = tmp_path / "src"
    save(src / "tumour" / "good.png")
    good_bytes = (src / "tumour" / "good.png").read_bytes()
    (src / "tumour" / "truncated.png").write_bytes(good_bytes[: len(good_bytes) // 2])
    (src / "stroma").mkdir()
    (src / "stroma" / "fake.tif").write_text("this is not a TIFF")
    save(src / "stroma" / "tiny.png", he_image()[:50, :50])

    report = prepare_dataset("folder", src, tmp_path / "out", tile=100)

    reasons = dict(report.skipped)
    assert sorted(reasons) == ["stroma/fake.tif", "stroma/tiny.png", "tumour/truncated.png"]
    assert "not a readable image" in reasons["stroma/fake.tif"]
    assert "corrupt or truncated" in reasons["tumour/truncated.png"]
    assert "smaller than one 100x100 tile" in reasons["stroma/tiny.png"]
    assert report.images_read == 2 and report.tiles_written == 6
    assert {i.source for i in read_dataset(tmp_path / "out").items} == {"tumour/good.png"}
    assert "tumour/truncated.png" in report.summary()


def test_output_folder_safety_and_options(tmp_path):
    src = tmp_path / "src"
    save(src / "tumour" / "a.png")
    with pytest.raises(HistoseekError, match="must be outside --src"):
        prepare_dataset("folder", src, src / "prepared")
    with pytest.raises(HistoseekError, match="must be outside --src"):
        prepare_dataset("folder", src, tmp_path)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    with pytest.raises(HistoseekError, match="not a dataset folder"):
        prepare_dataset("folder", src, foreign)
    assert (foreign / "thesis.docx").is_file()
    with pytest.raises(HistoseekError, match="choose one of folder, bach, bracs, crc"):
        prepare_dataset("tiff", src, tmp_path / "out")
    with pytest.raises(HistoseekError, match="--stride needs --tile"):
        prepare_dataset("folder", src, tmp_path / "out", stride=10)
    with pytest.raises(HistoseekError, match="between 0 and 1"):
        prepare_dataset("folder", src, tmp_path / "out", min_tissue=60)
    with pytest.raises(HistoseekError, match="does not exist"):
        prepare_dataset("folder", tmp_path / "missing", tmp_path / "out")

    prepare_dataset("folder", src, tmp_path / "out", tile=100)
    prepare_dataset("folder", src, tmp_path / "out")  # a prepared folder is replaced whole
    assert len(read_dataset(tmp_path / "out")) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "out", "src"]  # no staging left
