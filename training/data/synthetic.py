"""Procedural H&E-like tiles: a labelled dataset that needs no download.

Each class is a tissue *structure* (nuclei size and density, glands and lumens, fibres,
fat vacuoles, lymphocyte sheets...). Stain colour is drawn per source image ("group")
from one distribution shared by all classes, and each tile's mean H and E densities are
matched to class-independent random targets, so a tile's mean colour says next to nothing
about its class: an encoder has to learn texture to separate them.

Rendering follows Beer-Lambert: haematoxylin and eosin concentration maps are mixed with
per-group stain OD vectors, `RGB = 255 * exp(-OD)`, then blurred and given sensor noise.
Numpy only (FFT filtering), so 200 tiles of 128 px take a few seconds on two cores.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histoseek import atomic
from histoseek.dataset import Dataset, DatasetItem, write_manifest
from histoseek.errors import HistoseekError
from training.data.folders import check_output_folder

CLASS_NAMES = ("tumour", "stroma", "lymphocytes", "adipose", "mucosa", "necrosis", "muscle", "mucus")
TILES_PER_GROUP = 5  # tiles cut from one synthetic "source image": same stain, never split
TEST_FRACTION = 0.2

# Ruifrok & Johnston (2001) H&E optical-density vectors (R, G, B per unit concentration).
_H_REF = np.array([0.650, 0.704, 0.286])
_E_REF = np.array([0.072, 0.990, 0.105])
# Highest concentrations a tile may reach when its density is matched (OD ~1.5 is a
# dark nucleus; more would render black blobs).
_PEAK_H, _PEAK_E = 1.5, 1.6


def synthesize(out: Path, classes: int = 4, per_class: int = 50, size: int = 128, seed: int = 0) -> Dataset:
    """Write `out/<class>/<class>_<i>.png` and `out/manifest.csv`; same arguments, same bytes."""
    if not 1 <= classes <= len(CLASS_NAMES):
        raise HistoseekError(
            f"--classes must be between 1 and {len(CLASS_NAMES)} (available: {', '.join(CLASS_NAMES)}), got {classes}"
        )
    if per_class < 1:
        raise HistoseekError(f"--per-class must be at least 1, got {per_class}")
    if size < 32:
        raise HistoseekError(f"--size must be at least 32 pixels to show any tissue structure, got {size}")
    out = Path(out)
    check_output_folder(out)
    items: list[DatasetItem] = []
    with atomic.staged_directory(out) as staging:
        for class_index, name in enumerate(CLASS_NAMES[:classes]):
            (staging / name).mkdir()
            n_groups = -(-per_class // TILES_PER_GROUP)
            test_groups = _test_groups(n_groups, seed, class_index)
            for i in range(per_class):
                g = i // TILES_PER_GROUP
                stain = sample_stain(np.random.default_rng([seed, 0, class_index, g]))
                # Keyed by tile index, so tile i is the same whatever --per-class is.
                rgb = render_tile(name, size, np.random.default_rng([seed, 1, class_index, i]), stain)
                path = f"{name}/{name}_{i:04d}.png"
                (staging / path).write_bytes(_png_bytes(rgb))
                group = f"{name}-{g:03d}"
                split = "test" if g in test_groups else "train"
                items.append(DatasetItem(path=path, label=name, group=group, split=split, source=group))
        write_manifest(staging, items)
    return Dataset(out, items)


@dataclass(frozen=True)
class Stain:
    """One source image's staining: OD vectors, background haze, and mean stain densities."""

    h_vec: np.ndarray
    e_vec: np.ndarray
    background: np.ndarray
    density_h: float
    density_e: float


def sample_stain(rng: np.random.Generator) -> Stain:
    """Draw a staining the same way for every class, so colour carries no class information."""
    h_vec = np.abs(_H_REF + rng.normal(0, 0.08, 3))
    e_vec = np.abs(_E_REF + rng.normal(0, 0.08, 3))
    return Stain(
        h_vec=h_vec / np.linalg.norm(h_vec),
        e_vec=e_vec / np.linalg.norm(e_vec),
        background=rng.uniform(0.02, 0.08) * (1 + rng.normal(0, 0.15, 3)),
        density_h=rng.uniform(0.12, 0.45),
        density_e=rng.uniform(0.15, 0.5),
    )


def render_tile(kind: str, size: int, rng: np.random.Generator, stain: Stain | None = None) -> np.ndarray:
    """One `size`x`size` uint8 RGB tile of tissue `kind` (a fresh stain from `rng` unless given)."""
    if kind not in _RENDERERS:
        raise HistoseekError(f"unknown synthetic tissue {kind!r}; choose from {', '.join(CLASS_NAMES)}")
    stain = sample_stain(rng) if stain is None else stain
    zoom = size / 128  # structures are designed at 128 px; `size` only changes resolution
    h, e = _RENDERERS[kind](rng, size, zoom)
    # Bring the tile's mean H and E to the stain's densities (with a little per-tile
    # jitter) so that mean colour does not give the class away.
    jitter = rng.uniform(0.9, 1.1, 2)
    h = _match_density(h, stain.density_h * jitter[0], _PEAK_H, _field(rng, size, 16 * zoom))
    e = _match_density(e, stain.density_e * jitter[1], _PEAK_E, _field(rng, size, 16 * zoom))
    # Optical blur is linear, so blurring the two concentration maps equals blurring OD.
    h, e = _blur(h, 0.6 * zoom), _blur(e, 0.6 * zoom)
    od = h[..., None] * stain.h_vec + e[..., None] * stain.e_vec + stain.background
    rgb = 255.0 * np.exp(-od) + rng.normal(0.0, 2.5, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# --- per-class structure: each returns (haematoxylin, eosin) concentration maps ------------


def _tumour(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Solid sheets of crowded, large, pleomorphic, hyperchromatic nuclei; a few lumens.
    e = 0.45 * (1 + 0.25 * _field(rng, size, 6 * zoom))
    h = np.zeros((size, size))
    n = int(size * size / (95 * zoom**2))
    a = rng.uniform(3.5, 6.0, n) * zoom
    _stamp(h, _uniform_points(rng, n, size, a.max()), a, a * rng.uniform(0.6, 1.0, n),
           rng.uniform(0, np.pi, n), rng.uniform(0.9, 1.4, n))
    h *= 0.75 + 0.25 * (_field(rng, size, 0.8 * zoom) > 0)  # coarse chromatin
    lumen = _field(rng, size, 7 * zoom) > 1.7
    return np.where(lumen, 0.0, h), np.where(lumen, 0.02, e)


def _stroma(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Wavy collagen fibres in one rough direction, loose gaps, sparse spindle nuclei.
    angle = rng.uniform(0, np.pi)
    fibres = _field(rng, size, 10 * zoom, 1.2 * zoom, angle)
    e = 0.6 * np.clip(0.55 + 0.45 * fibres, 0.03, 1.4)
    h = np.zeros((size, size))
    n = max(1, int(size * size / (700 * zoom**2)))
    a = rng.uniform(5, 8, n) * zoom
    _stamp(h, _uniform_points(rng, n, size, a.max()), a, rng.uniform(1.2, 1.8, n) * zoom,
           angle + rng.normal(0, 0.2, n), rng.uniform(0.8, 1.1, n))
    return h, e


def _lymphocytes(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Sheets of small, round, uniformly dark nuclei with scant cytoplasm.
    e = 0.2 * (1 + 0.3 * _field(rng, size, 4 * zoom))
    h = np.zeros((size, size))
    n = int(size * size / (30 * zoom**2))
    a = rng.uniform(2.2, 3.0, n) * zoom
    _stamp(h, _uniform_points(rng, n, size, a.max()), a, a * rng.uniform(0.85, 1.0, n),
           rng.uniform(0, np.pi, n), rng.uniform(1.1, 1.5, n))
    return h, e


def _adipose(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Large empty fat vacuoles (Voronoi cells) with thin eosinophilic membranes.
    edge = _voronoi_edge_distance(rng, size, spacing=30 * zoom)
    membrane = np.clip(1.0 - edge / (1.3 * zoom), 0, 1)
    e = 0.7 * membrane
    h = np.zeros((size, size))
    ys, xs = np.nonzero(membrane > 0.9)
    n = min(len(ys), max(1, int(size * size / (2500 * zoom**2))))
    if n:
        pick = rng.choice(len(ys), n, replace=False)
        _stamp(h, np.stack([ys[pick], xs[pick]], 1).astype(float), np.full(n, 4.0 * zoom),
               np.full(n, 1.3 * zoom), rng.uniform(0, np.pi, n), np.full(n, 0.9))
    return h, e


def _mucosa(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Crypts: round lumens lined by columnar epithelium with basal nuclei and goblet
    # cells, set in lamina propria with scattered small nuclei.
    spacing = 44 * zoom
    grid = np.arange(-spacing / 2, size + spacing, spacing)
    centres = np.array([(y, x) for y in grid for x in grid]) + rng.uniform(-0.25, 0.25, (len(grid) ** 2, 2)) * spacing
    radii = rng.uniform(14, 18, len(centres)) * zoom
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    squared = (yy[..., None] - centres[:, 0]) ** 2 + (xx[..., None] - centres[:, 1]) ** 2
    dist = np.sqrt(np.min(squared / radii**2, axis=-1))  # 1 at the nearest gland's edge
    lumen, epithelium = dist < 0.4, (dist >= 0.4) & (dist < 1.0)
    # Basal nuclei on a ring at 0.85 R, elongated radially; goblet cups nearer the lumen.
    per_gland = (2 * np.pi * radii / (3.3 * zoom)).astype(int)
    gland = np.repeat(np.arange(len(centres)), per_gland)
    phi = rng.uniform(0, 2 * np.pi, len(gland))
    ring = centres[gland] + 0.85 * radii[gland, None] * np.stack([np.sin(phi), np.cos(phi)], 1)
    cup_gland = rng.choice(gland, len(gland) // 3)
    cup_phi = rng.uniform(0, 2 * np.pi, len(cup_gland))
    cups = centres[cup_gland] + 0.6 * radii[cup_gland, None] * np.stack([np.sin(cup_phi), np.cos(cup_phi)], 1)
    h = np.zeros((size, size))
    goblets = np.zeros((size, size))
    n, m = len(ring), len(cups)
    _stamp(h, ring, np.full(n, 3.4 * zoom), np.full(n, 1.6 * zoom), phi, rng.uniform(0.8, 1.1, n))
    _stamp(goblets, cups, np.full(m, 2.6 * zoom), np.full(m, 2.2 * zoom), cup_phi, np.ones(m))
    k = int(size * size / (260 * zoom**2))
    _stamp(h, _uniform_points(rng, k, size, 3 * zoom), np.full(k, 2.3 * zoom), np.full(k, 2.0 * zoom),
           rng.uniform(0, np.pi, k), rng.uniform(0.7, 1.0, k))
    e = np.where(epithelium, 0.5, 0.35 * (1 + 0.3 * _field(rng, size, 5 * zoom))) * (1 - 0.8 * goblets)
    return np.where(lumen, 0.0, h * (1 - goblets)), np.where(lumen, 0.0, e)


def _necrosis(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Patchy, granular eosin with a haematoxylin smear, nuclear dust and pale ghost cells.
    e = 0.5 * np.clip(1 + 0.6 * _field(rng, size, 5 * zoom) + 0.25 * _field(rng, size, 1 * zoom), 0.1, 2.2)
    h = 0.15 * np.clip(1 + _field(rng, size, 9 * zoom), 0, 2.5)
    n = int(size * size / (55 * zoom**2))
    a = rng.uniform(0.8, 1.8, n) * zoom
    _stamp(h, _uniform_points(rng, n, size, 2 * zoom), a, a * rng.uniform(0.5, 1.0, n),
           rng.uniform(0, np.pi, n), rng.uniform(0.5, 1.2, n))
    m = max(1, int(size * size / (600 * zoom**2)))
    _stamp(h, _uniform_points(rng, m, size, 5 * zoom), np.full(m, 4.5 * zoom), np.full(m, 3.5 * zoom),
           rng.uniform(0, np.pi, m), np.full(m, 0.3))
    return _blur(h, 0.8 * zoom), e


def _muscle(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Dense, long, parallel smooth-muscle fibres with thin clefts and aligned cigar nuclei.
    angle = rng.uniform(0, np.pi)
    fibres = _field(rng, size, 28 * zoom, 2.5 * zoom, angle)
    e = 0.75 * np.where(fibres < -1.3, 0.1, np.clip(0.95 + 0.3 * fibres, 0.3, 1.5))
    h = np.zeros((size, size))
    n = max(1, int(size * size / (380 * zoom**2)))
    _stamp(h, _uniform_points(rng, n, size, 9 * zoom), rng.uniform(6, 9, n) * zoom,
           rng.uniform(1.3, 1.9, n) * zoom, angle + rng.normal(0, 0.08, n), rng.uniform(0.8, 1.0, n))
    return h, e


def _mucus(rng: np.random.Generator, size: int, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    # Pale, bluish, wispy mucin strands (level lines of a smooth field), few floating cells.
    strands = np.exp(-((_field(rng, size, 6 * zoom) / 0.18) ** 2)) + 0.6 * np.exp(
        -((_field(rng, size, 3 * zoom) / 0.15) ** 2)
    )
    h = 0.08 + 0.3 * strands
    e = 0.06 + 0.25 * strands
    n = max(1, int(size * size / (1500 * zoom**2)))
    _stamp(h, _uniform_points(rng, n, size, 3 * zoom), np.full(n, 3.0 * zoom), np.full(n, 2.5 * zoom),
           rng.uniform(0, np.pi, n), rng.uniform(0.6, 1.0, n))
    return h, e


_RENDERERS = {
    "tumour": _tumour, "stroma": _stroma, "lymphocytes": _lymphocytes, "adipose": _adipose,
    "mucosa": _mucosa, "necrosis": _necrosis, "muscle": _muscle, "mucus": _mucus,
}


# --- stain, density and image helpers -------------------------------------------------------


def _match_density(c: np.ndarray, target: float, peak: float, wash: np.ndarray) -> np.ndarray:
    """Scale concentrations so their mean is `target` without exceeding `peak`.

    Sparse tissue (fat, stroma nuclei) cannot reach the target by scaling alone; the
    shortfall becomes a faint, smooth background wash, as in a thick or over-stained section.
    """
    c = c * min(target / max(c.mean(), 1e-6), peak / max(c.max(), 1e-6))
    shortfall = max(target - c.mean(), 0.0)
    return c + shortfall * np.clip(1 + 0.3 * wash, 0, None)


def _field(rng: np.random.Generator, size: int, sigma: float, sigma_across: float | None = None,
           angle: float = 0.0) -> np.ndarray:
    """Smooth random field, zero mean, unit std; anisotropic (fibres) when `sigma_across` is given."""
    noise = _blur(rng.standard_normal((size, size)), sigma, sigma_across, angle)
    return (noise - noise.mean()) / (noise.std() + 1e-12)


def _blur(image: np.ndarray, sigma: float, sigma_across: float | None = None, angle: float = 0.0) -> np.ndarray:
    """Gaussian blur by FFT (periodic borders: cheap, and invisible on texture)."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    along = fy * np.sin(angle) + fx * np.cos(angle)
    across = -fy * np.cos(angle) + fx * np.sin(angle)
    s_across = sigma if sigma_across is None else sigma_across
    gain = np.exp(-2 * np.pi**2 * (sigma**2 * along**2 + s_across**2 * across**2))
    return np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)


def _uniform_points(rng: np.random.Generator, n: int, size: int, margin: float) -> np.ndarray:
    # Centres may fall just outside the tile so that structures are cut by its border.
    return rng.uniform(-margin, size + margin, (n, 2))


def _stamp(canvas: np.ndarray, centres: np.ndarray, a: np.ndarray, b: np.ndarray, angle: np.ndarray,
           strength: np.ndarray) -> None:
    """Draw soft-edged ellipses (semi-axes a along `angle`, b across), keeping the max where they overlap.

    All ellipses are evaluated at once on a small window around each centre (vectorised:
    a tile holds hundreds of nuclei).
    """
    if len(centres) == 0:
        return
    r = int(np.ceil(max(a.max(), b.max()))) + 1
    offsets = np.arange(-r, r + 2)
    cy, cx = (centres[:, i][:, None, None] for i in (0, 1))
    iy = np.floor(cy).astype(int) + offsets[None, :, None]
    ix = np.floor(cx).astype(int) + offsets[None, None, :]
    dy, dx = iy - cy, ix - cx
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    a, b, strength = (v[:, None, None] for v in (a, b, strength))
    u = (dx * cos + dy * sin) / a
    v = (-dx * sin + dy * cos) / b
    value = np.clip((1 - np.sqrt(u * u + v * v)) * b + 0.5, 0, 1) * strength  # ~1 px anti-aliased edge
    iy, ix = np.broadcast_arrays(iy, ix)
    keep = (value > 0) & (iy >= 0) & (iy < canvas.shape[0]) & (ix >= 0) & (ix < canvas.shape[1])
    np.maximum.at(canvas, (iy[keep], ix[keep]), value[keep])


def _voronoi_edge_distance(rng: np.random.Generator, size: int, spacing: float) -> np.ndarray:
    """Distance (px) to the nearest cell wall of jittered seed points' Voronoi cells
    (half the gap between the nearest and second-nearest seed: close enough for fat)."""
    grid = np.arange(-spacing, size + spacing, spacing)
    seeds = np.array([(y, x) for y in grid for x in grid]) + rng.uniform(-0.4, 0.4, (len(grid) ** 2, 2)) * spacing
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    squared = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    squared.sort(axis=-1)  # faster than np.partition on short rows
    return (np.sqrt(squared[..., 1]) - np.sqrt(squared[..., 0])) / 2


def _test_groups(n_groups: int, seed: int, class_index: int) -> set[int]:
    """A seeded ~20% of a class's source images for "test" (whole groups, never split)."""
    n_test = int(np.floor(TEST_FRACTION * n_groups + 0.5))
    order = np.random.default_rng([seed, 2, class_index]).permutation(n_groups)
    return set(order[:n_test].tolist())


def _png_bytes(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)  # noisy tiles barely compress
    return buffer.getvalue()
