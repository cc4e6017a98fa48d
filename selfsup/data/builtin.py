"""`shapes`: a procedurally generated, labelled image dataset that needs no download or storage.

Image `i` of a split is a pure function of (split, i): its randomness comes from a counter-based
Philox generator keyed by (split_id, i), so any example can be drawn in any order on any host.
Images are 32 x 32 RGB uint8; the label is `i % 10`, so every split is exactly balanced.

Each image shows one object on a flat background, both in independent random colours (colour
carries no label information), at a random centre and size (half-size 5 to 12 px), with
anti-aliased edges and uniform pixel noise (standard deviation 0.03 to 0.08 of full range).
The ten classes:

  0 disc              1 square            2 triangle (pointing up)   3 ring
  4 plus (cross)      5 frame (hollow square)
  6 horizontal stripes   7 vertical stripes   8 diagonal stripes   9 checkerboard

Classes 6-9 fill a square patch with a texture of random period (3 to 6 px) and phase. Because
position, polarity and colours vary, a linear classifier on raw pixels does poorly, while
translation-invariant shape/texture features separate the classes well.
"""

from __future__ import annotations

import numpy as np

NAMES = ("shapes",)
NUM_CLASSES = 10
IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 20000, "test": 2000}
_SPLIT_IDS = {"train": 0, "test": 1}

# Pixel-centre coordinates, shared by every image.
_Y, _X = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + np.float32(0.5)
# Outward edge normals of an upward-pointing equilateral triangle (image y axis points down).
_TRI_NORMALS = [(np.cos(a), np.sin(a)) for a in np.pi / 2 + 2 * np.pi * np.arange(3) / 3]


def _unit(x: np.ndarray) -> np.ndarray:
    # np.clip's Python wrapper costs more than the arithmetic on 32 x 32 arrays.
    return np.minimum(np.maximum(x, 0.0), 1.0)


def _edge_alpha(sd: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] from a signed distance in px (negative inside): a 1-px soft edge."""
    return _unit(0.5 - sd)


def _texture_alpha(v: np.ndarray) -> np.ndarray:
    """A soft square wave from a sinusoid in [-1, 1]."""
    return _unit(0.5 + 1.5 * v)


def _coverage(label: int, dx: np.ndarray, dy: np.ndarray, r: float, p: list[float]) -> np.ndarray:
    """Foreground coverage [32, 32] of class `label` centred at offsets (dx, dy), half-size r px."""
    ax, ay = np.abs(dx), np.abs(dy)
    if label == 0:
        return _edge_alpha(np.hypot(dx, dy) - r)
    if label == 1:  # half-side 0.886 r: the same area as the disc
        return _edge_alpha(np.maximum(ax, ay) - 0.886 * r)
    if label == 2:
        sd = np.maximum.reduce([dx * nx + dy * ny for nx, ny in _TRI_NORMALS]) - 0.6 * r
        return _edge_alpha(sd)
    if label == 3:
        return _edge_alpha(np.abs(np.hypot(dx, dy) - 0.8 * r) - 0.22 * r)
    if label == 4:
        w = 0.3 * r
        return _edge_alpha(np.minimum(np.maximum(ax - w, ay - r), np.maximum(ay - w, ax - r)))
    if label == 5:
        return _edge_alpha(np.abs(np.maximum(ax, ay) - 0.75 * r) - 0.2 * r)
    # Textures: a square patch filled with stripes or a checkerboard.
    k = 2 * np.pi / (3.0 + 3.0 * p[0])
    phase = 2 * np.pi * p[1]
    if label == 6:
        v = np.sin(k * dy + phase)
    elif label == 7:
        v = np.sin(k * dx + phase)
    elif label == 8:
        v = np.sin(k * (dx + dy) / np.sqrt(2) + phase)
    else:
        v = np.sin(k * dx + phase) * np.sin(k * dy + 2 * np.pi * p[2])
    return _edge_alpha(np.maximum(ax, ay) - r) * _texture_alpha(v)


def example(split: str, index: int) -> tuple[np.ndarray, int]:
    """Example `index` of `split` ("train" or "test"): (uint8 [32, 32, 3], label in 0..9)."""
    if split not in SPLIT_SIZES:
        raise KeyError(f"builtin split {split!r}; choose one of {sorted(SPLIT_SIZES)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise IndexError(f"index {index} out of range for split {split!r}")
    label = index % NUM_CLASSES
    # Philox is counter-based: keying it costs far less than seeding PCG64 through SeedSequence.
    rng = np.random.Generator(np.random.Philox(key=(_SPLIT_IDS[split] << 32) | index))
    u = rng.random(13)
    r = 5.0 + 7.0 * float(u[0])
    cx = r + (IMAGE_SIZE - 2 * r) * float(u[1])
    cy = r + (IMAGE_SIZE - 2 * r) * float(u[2])
    fg, bg = u[3:6].astype(np.float32), u[6:9].astype(np.float32)
    if np.abs(fg - bg).max() < 0.3:  # keep the object visible
        fg = (bg + 0.5) % 1.0
    noise_amp = (0.03 + 0.05 * float(u[9])) * np.sqrt(12.0)  # uniform noise with that std
    alpha = _coverage(label, _X - cx, _Y - cy, r, u[10:13].tolist())
    # Channel-first while composing: NumPy broadcasts slowly over a trailing axis of length 3.
    img = bg[:, None, None] + alpha * (fg - bg)[:, None, None]
    img += noise_amp * (rng.random(img.shape, dtype=np.float32) - 0.5)
    img = _unit(img) * 255.0 + 0.5
    return img.transpose(1, 2, 0).astype(np.uint8, order="C"), label
