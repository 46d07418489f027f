"""Label maps for queries from another collection: read strictly, applied to every query."""
from __future__ import annotations

from pathlib import Path

import pytest

from histoseek.dataset import Dataset, DatasetItem
from histoseek.errors import HistoseekError
from histoseek.label_map import read_label_map, relabel

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "configs" / "label_maps" / "crc-val-he-7k_to_kather2016.csv"
SHARED = ROOT.parent / "shared" / "data"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "map.csv"
    path.write_text(text)
    return path


def test_the_shipped_map_says_each_crc_val_class_in_kather_2016_words():
    mapping = read_label_map(SHIPPED)
    assert mapping["MUS"] == mapping["STR"] == "02_STROMA"
    assert (mapping["MUC"], mapping["NORM"], mapping["TUM"]) == ("05_DEBRIS", "06_MUCOSA", "01_TUMOR")
    kather = sorted(p.name for p in (ROOT / "demo" / "collection" / "kather2016").iterdir() if p.is_dir())
    assert set(mapping.values()) <= set(kather)


@pytest.mark.parametrize("text, message", [
    ("a,b\nx,y\n", "needs a header row"),
    ("query_label,database_label\n", "maps no label"),
    ("query_label,database_label\nMUS,\n", "line 2: both labels"),
    ("query_label,database_label\nMUS,02_STROMA\nMUS,05_DEBRIS\n", "MUS is mapped to both 02_STROMA and 05_DEBRIS"),
])
def test_bad_maps_are_refused_with_the_line(tmp_path, text, message):
    with pytest.raises(HistoseekError, match=message):
        read_label_map(_write(tmp_path, text))


def test_unreadable_map(tmp_path):
    with pytest.raises(HistoseekError, match="cannot read the label map"):
        read_label_map(tmp_path / "missing.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(HistoseekError, match="label map"):
        read_label_map(tmp_path / "binary.csv")


def test_relabel_translates_and_refuses_what_cannot_be_scored():
    queries = Dataset(Path("q"), [DatasetItem("a.png", "MUS", "g1"), DatasetItem("b.png", "STR", "g2")])
    mapping = {"MUS": "02_STROMA", "STR": "02_STROMA", "TUM": "09_NOWHERE"}  # TUM unused: not checked
    assert [i.label for i in relabel(queries, mapping, ["01_TUMOR", "02_STROMA"]).items] == ["02_STROMA"] * 2
    with pytest.raises(HistoseekError, match="no row for the query labels STR"):
        relabel(queries, {"MUS": "02_STROMA"}, ["02_STROMA"])
    with pytest.raises(HistoseekError, match="database does not hold: 02_STROMA"):
        relabel(queries, mapping, ["01_TUMOR"])


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "crc-val-he-7k-sample").is_dir(), reason="../shared/data is absent")
def test_cross_collection_evaluation_from_the_command_line(capsys):
    """The 32 CRC-VAL-HE-7K tiles against the demo collection, frozen ImageNet backbone."""
    from benchmarks.frozen_backbone import frozen_backbone
    from training.evaluate import evaluate_backbone

    trunk, spec = frozen_backbone("tf_efficientnet_lite0", 224)
    result = evaluate_backbone(trunk, spec, ROOT / "demo" / "collection" / "kather2016",
                               SHARED / "crc-val-he-7k-sample", [5], label_map=read_label_map(SHIPPED))
    assert result["metrics"]["queries"] == 32
    assert 0.25 <= result["metrics"]["mMV@5"] <= 1.0  # far above chance (1/7 of the mapped classes)
