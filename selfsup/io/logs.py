"""Where a run reports: TensorBoard event files, `metrics.jsonl`, and PNG images.

Only process 0 writes (`active=False` elsewhere makes every call a no-op). The workdir may be a
URL (`gs://...`, see `selfsup.io.paths`): object stores cannot append, so `metrics.jsonl` and the
TensorBoard events (tensorboardX has no gcsfs support) are then written in a local staging folder
and copied whole to the workdir every `sync_secs` and at `close`; images are written directly.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping

import numpy as np
from PIL import Image

from selfsup.io import paths

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class Writer:
    """Scalars to TensorBoard and `<workdir>/metrics.jsonl`; images to TensorBoard and PNG files."""

    def __init__(self, workdir: str, *, active: bool = True, sync_secs: float = 30.0):
        self.workdir = paths.path(workdir)
        self.active = active
        self.remote = paths.is_url(self.workdir)
        self.sync_secs = sync_secs
        if not active:
            return
        from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

        if self.remote:  # a resumed run appends to the metrics already in the bucket
            self._stage = tempfile.mkdtemp(prefix="selfsup-logs-")
            if (self.workdir / METRICS).exists():
                (self.workdir / METRICS).copy(os.path.join(self._stage, METRICS))
        else:
            self._stage = os.fspath(self.workdir)
        os.makedirs(self._stage, exist_ok=True)
        # Event files are named by the second and host: a suffix keeps two runs started in the
        # same second (a quick resume) from sharing, and in a bucket overwriting, one file.
        self._tb = SummaryWriter(
            os.path.join(self._stage, TENSORBOARD),
            flush_secs=30,
            filename_suffix=f".{uuid.uuid4().hex[:8]}",
        )
        self._jsonl = open(os.path.join(self._stage, METRICS), "a")  # noqa: SIM115
        self._synced = time.monotonic()

    def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self.remote and time.monotonic() - self._synced >= self.sync_secs:
            self.sync()

    def image(self, step: int, name: str, image: np.ndarray) -> str | None:
        """Write a uint8 [H, W, 3] image as `images/<name>_<step>.png` and to TensorBoard."""
        if not self.active:
            return None
        path = self.workdir / "images" / f"{name}_{step:07d}.png"
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        paths.write_bytes(path, png.getvalue())
        self._tb.add_image(name, image, step, dataformats="HWC")
        return os.fspath(path)

    def sync(self) -> None:
        """Copy the staged metrics and TensorBoard events to a URL workdir (no-op if local)."""
        if self.active and self.remote:
            self._tb.flush()
            self._jsonl.flush()
            self._upload()

    def _upload(self) -> None:
        paths.upload(os.path.join(self._stage, METRICS), self.workdir / METRICS)
        events = os.path.join(self._stage, TENSORBOARD)
        for name in sorted(os.listdir(events)):
            paths.upload(os.path.join(events, name), self.workdir / TENSORBOARD / name)
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.active:
            self._tb.close()
            self._jsonl.close()
            if self.remote:
                self._upload()
                shutil.rmtree(self._stage, ignore_errors=True)
            self.active = False


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
    path = paths.path(workdir) / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

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
    if kept != lines:
        paths.write_text(path, "".join(kept))  # atomic on a local disk, whole on a bucket
