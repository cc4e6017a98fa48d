"""Where a run reports: TensorBoard event files, `metrics.jsonl`, and PNG images.

Only process 0 writes (`active=False` elsewhere makes every call a no-op).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image


class Writer:
    """Scalars to TensorBoard and `<workdir>/metrics.jsonl`; images to TensorBoard and PNG files."""

    def __init__(self, workdir: str, *, active: bool = True):
        self.workdir = workdir
        self.active = active
        if active:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

            os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()

    def image(self, step: int, name: str, image: np.ndarray) -> str | None:
        """Write a uint8 [H, W, 3] image as `images/<name>_<step>.png` and to TensorBoard."""
        if not self.active:
            return None
        path = os.path.join(self.workdir, "images", f"{name}_{step:07d}.png")
        Image.fromarray(image).save(path)
        self._tb.add_image(name, image, step, dataformats="HWC")
        return path

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()


def image_grid(columns: Mapping[str, np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of images side by side, one column per entry (e.g. original | masked | reconstruction).

    columns: name -> float [B, H, W, 3] in [0, 1]. Returns uint8 [B*(H+pad)+pad, C*(W+pad)+pad, 3].
    """
    arrays = [np.clip(np.asarray(a, np.float32), 0.0, 1.0) for a in columns.values()]
    b, h, w, _ = arrays[0].shape
    grid = np.ones((b * (h + pad) + pad, len(arrays) * (w + pad) + pad, 3), np.float32)
    for col, array in enumerate(arrays):
        for row in range(b):
            top, left = pad + row * (h + pad), pad + col * (w + pad)
            grid[top : top + h, left : left + w] = array[row]
    scale = max(1, math.ceil(128 / h))  # small images are hard to see: upscale by pixel repeat
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return (grid * 255 + 0.5).astype(np.uint8)


def drop_records_after(workdir: str, step: int) -> None:
    """Remove the records of steps after `step` from `<workdir>/metrics.jsonl`, which a run
    resumed from the checkpoint of `step` logs again, and a last line cut short by a kill (the
    next record would be appended to it). Rewritten atomically; a missing file is a new run."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()

    def record(line: str):
        try:
            return json.loads(line)
        except ValueError:
            return None

    kept = list(lines)
    if kept and not kept[-1].endswith("\n"):
        kept[-1:] = [kept[-1] + "\n"] if record(kept[-1]) is not None else []
    kept = [
        line
        for line in kept
        if not (
            isinstance(r := record(line), dict)
            and isinstance(r.get("step"), int)
            and r["step"] > step
        )
    ]
    if kept == lines:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
