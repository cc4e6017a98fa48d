"""Sources without a test split of their own: a fixed part of each class is held out as "test"."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from selfsup.errors import UserError

if TYPE_CHECKING:  # sources imports this module
    from selfsup.data.sources import Source

HOLDOUT_FRACTION = 0.1
_HOLDOUT_SEED = 20260  # fixed: the held-out images never depend on config.seed


def has_split(kind: str, path: Path, split: str) -> bool:
    """Whether the npz / folder at `path` has its own `split` (`<split>_images`, `path/<split>/`).
    UserError for a folder with split subfolders but not this one."""
    if kind == "npz":
        with zipfile.ZipFile(path) as zf:
            return f"{split}_images.npy" in zf.namelist()
    if (path / split).is_dir():
        return True
    if (path / "train").is_dir():
        found = sorted(e.name for e in os.scandir(path) if e.is_dir() and e.name[0] != ".")
        raise UserError(
            f"{path} has split folders ({', '.join(found)}) but no {split}/; add "
            f"{path / split}/<class>/<images>, or evaluate on another split (e.g. "
            f"--config.test_split={found[-1]})"
        )
    return False


def holdout_mask(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """bool [N], True for the held-out rows: in each class of n rows, round(fraction * n) of them
    (at least 1 when n >= 2), picked by a permutation seeded with (class, n) only, so the same
    files are held out in every run, whatever the seed or the other classes."""
    labels = np.asarray(labels)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = len(rows)
        k = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
        order = np.random.default_rng([_HOLDOUT_SEED, int(c), n]).permutation(n)
        held[rows[order[:k]]] = True
    return held


class HeldOut:
    """The train or test part of a source that has no test split (see `holdout`)."""

    def __init__(self, source: Source, rows: np.ndarray, description: str):
        self.source, self.rows, self.description = source, rows, description
        self.num_classes, self.image_size = source.num_classes, source.image_size
        self.labels = np.asarray(source.labels)[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.source[int(self.rows[i])]


def holdout(source: Source, split: str, path: Any) -> HeldOut:
    """Split "train" or "test" of a source without one (an npz of `images`/`labels`, a folder
    of `<class>/<image>`): "test" is `holdout_mask` of its labels (10% of each class), "train"
    the rest, so pretraining never sees the images evaluation reports on."""
    if split not in ("train", "test"):
        raise UserError(
            f"{path} has no split {split!r}: without splits of its own, its 'train' is 90% of "
            f"each class and 'test' the other 10%; use those, or provide {split} separately"
        )
    held = holdout_mask(source.labels)
    rows = np.flatnonzero(held if split == "test" else ~held)
    part = "held out from 'train'" if split == "test" else "less the 10% of each class held out"
    return HeldOut(source, rows, f"{len(rows)} of the {len(held)} images of {path} ({part})")
