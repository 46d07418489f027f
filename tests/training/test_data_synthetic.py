"""The synthetic H&E generator: layout, determinism, and that classes differ by texture, not colour."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from histoseek.dataset import read_dataset
from histoseek.errors import HistoseekError
from training.data.synthetic import CLASS_NAMES, TILES_PER_GROUP, synthesize


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_manifest_and_groups(tmp_path):
    out = tmp_path / "synth"
    dataset = synthesize(out, classes=3, per_class=12, size=64, seed=0)

    assert sorted(p.name for p in out.iterdir()) == ["lymphocytes", "manifest.csv", "stroma", "tumour"]
    assert (out / "tumour" / "tumour_0011.png").is_file()
    assert read_dataset(out).items == dataset.items
    assert len(dataset) == 36 and dataset.labels == ["lymphocytes", "stroma", "tumour"]
    for name in dataset.labels:
        items = [i for i in dataset.items if i.label == name]
        groups = {}
        for item in items:
            groups.setdefault(item.group, []).append(item)
        # 12 tiles -> source images of 5, 5 and 2 tiles; a group is never split.
        assert sorted(len(g) for g in groups.values()) == [2, TILES_PER_GROUP, TILES_PER_GROUP]
        assert all(len({i.split for i in g}) == 1 for g in groups.values())
        # ~20% of 3 groups rounds to one test group.
        assert sorted(g[0].split for g in groups.values()) == ["test", "train", "train"]
    image = np.asarray(Image.open(out / dataset.items[0].path))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_tiles_look_like_h_and_e(tmp_path):
    # Haematoxylin and eosin both absorb green most: G is the darkest channel, and there
    # is real contrast (nuclei, lumens), not a flat colour.
    dataset = synthesize(tmp_path / "synth", classes=len(CLASS_NAMES), per_class=2, size=64)
    for item in dataset.items:
        rgb = np.asarray(Image.open(dataset.absolute(item)), dtype=float)
        r, g, b = rgb.reshape(-1, 3).mean(0)
        assert g < r and g < b, item.path
        assert rgb.std() > 8, item.path


def test_same_arguments_same_bytes(tmp_path):
    first = _files(synthesize(tmp_path / "a", classes=2, per_class=6, size=48, seed=7).root)
    again = _files(synthesize(tmp_path / "b", classes=2, per_class=6, size=48, seed=7).root)
    other = _files(synthesize(tmp_path / "c", classes=2, per_class=6, size=48, seed=8).root)
    fewer = _files(synthesize(tmp_path / "d", classes=2, per_class=3, size=48, seed=7).root)

    assert first == again
    assert all(first[name] != other[name] for name in first if name.endswith(".png"))
    # A tile depends on its index, not on how many tiles were asked for.
    assert all(first[name] == data for name, data in fewer.items() if name.endswith(".png"))


def test_rewrites_its_own_folder_but_refuses_a_foreign_one(tmp_path):
    out = tmp_path / "synth"
    synthesize(out, classes=1, per_class=2, size=32)
    synthesize(out, classes=2, per_class=1, size=32)  # replaces a dataset folder whole
    assert read_dataset(out).labels == ["stroma", "tumour"] and len(read_dataset(out)) == 2

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    with pytest.raises(HistoseekError, match="not a dataset folder"):
        synthesize(foreign, classes=1, per_class=1, size=32)
    assert (foreign / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": len(CLASS_NAMES) + 1}, "between 1 and 8.*necrosis"),
    ({"classes": 0}, "between 1 and"),
    ({"per_class": 0}, "--per-class"),
    ({"size": 8}, "--size"),
])
def test_bad_arguments_are_explained(tmp_path, kwargs, message):
    with pytest.raises(HistoseekError, match=message):
        synthesize(tmp_path / "synth", **kwargs)
    assert not (tmp_path / "synth").exists()


# --- colour versus texture ----------------------------------------------------------------


def _mean_colour(rgb: np.ndarray) -> np.ndarray:
    return rgb.reshape(-1, 3).mean(0)


def _texture(rgb: np.ndarray) -> np.ndarray:
    """A handcrafted texture descriptor blind to stain colour and amount: on the grey optical
    density standardised per tile, at two scales: gradient-magnitude histogram, orientation
    coherence (fibres), a rotation-invariant local-binary-pattern histogram, and quantiles."""
    od = -np.log((rgb.astype(float) + 1) / 256).sum(-1)
    half = od.reshape(od.shape[0] // 2, 2, od.shape[1] // 2, 2).mean((1, 3))
    features = []
    for image in (od, half):
        g = (image - image.mean()) / (image.std() + 1e-6)
        gy, gx = np.gradient(g)
        features += list(np.histogram(np.hypot(gx, gy), bins=8, range=(0, 2))[0] / g.size)
        jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
        features.append(np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9))
        centre = g[1:-1, 1:-1]
        brighter = sum(
            (np.roll(g, (dy, dx), (0, 1))[1:-1, 1:-1] > centre).astype(int)
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
        )
        features += list(np.bincount(brighter.ravel(), minlength=9) / brighter.size)
        features += list(np.percentile(g, [5, 25, 50, 75, 95]))
    return np.array(features)


def _leave_one_group_out_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Nearest class centroid (standardised features), each source image held out in turn,
    so that a tile is never classified with the help of its own source image's stain."""
    features = (features - features.mean(0)) / (features.std(0) + 1e-9)
    classes = np.unique(labels)
    correct = 0
    for group in np.unique(groups):
        held_out = groups == group
        centroids = np.stack([features[~held_out & (labels == c)].mean(0) for c in classes])
        distances = ((features[held_out, None] - centroids[None]) ** 2).sum(-1)
        correct += int((classes[distances.argmin(1)] == labels[held_out]).sum())
    return correct / len(labels)


def test_classes_differ_in_texture_not_in_mean_colour(tmp_path):
    dataset = synthesize(tmp_path / "synth", classes=len(CLASS_NAMES), per_class=20, size=64, seed=3)
    images = [np.asarray(Image.open(dataset.absolute(item))) for item in dataset.items]
    labels = np.array([item.label for item in dataset.items])
    groups = np.array([item.group for item in dataset.items])

    colour = _leave_one_group_out_accuracy(np.stack([_mean_colour(i) for i in images]), labels, groups)
    texture = _leave_one_group_out_accuracy(np.stack([_texture(i) for i in images]), labels, groups)

    # Chance is 1/8 = 0.125. Stain is drawn per source image from one distribution for all
    # classes and mean stain densities are matched, so mean colour should stay near chance
    # (0.35 leaves room for sampling noise over 160 tiles); a simple texture descriptor must
    # separate the classes almost perfectly.
    assert colour < 0.35, colour
    assert texture > 0.9, texture
    assert texture - colour > 0.5
