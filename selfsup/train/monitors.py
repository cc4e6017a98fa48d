"""What the loop watches while it trains: the metrics window (NaN/Inf checks, images/s),
reconstruction images for the masked objectives, and SIGINT/SIGTERM.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from selfsup import augment, data, objectives
from selfsup.errors import UserError
from selfsup.io import logs
from selfsup.parallel import sharding


class Diverged(UserError):
    """The loss or gradient norm became NaN/Inf."""


class MetricWindow:
    """Per-step metrics fetched from the device with one step of lag, checked for NaN/Inf, and
    averaged over the log window."""

    def __init__(self, batch_size: int, on_diverged):
        self.batch_size = batch_size
        self.on_diverged = on_diverged
        self.pending: tuple[int, dict] | None = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.perf_counter()

    def push(self, step: int, metrics: dict) -> None:
        """Queue this step's (device) metrics; fetch and check the previous step's."""
        self.drain()
        self.pending = (step, metrics)

    def drain(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.check(values, step + 1)
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def check(self, values: dict[str, float], step: int) -> None:
        """Raise `Diverged` if the loss or a norm among `values` (after `step` steps) is NaN/Inf."""
        bad = [
            k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(values.get(k, 0.0))
        ]
        if bad:
            raise Diverged(
                f"{bad[0]} is {values[bad[0]]} at step {step}; stopped. {self.on_diverged()} "
                "Lower optim.base_lr or set optim.grad_clip_norm, then run again."
            )

    def flush(self) -> dict[str, float]:
        """Averages since the last flush, plus images/s over that wall time."""
        now = time.perf_counter()
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out["images_per_s"] = self.count * self.batch_size / max(now - self.started, 1e-9)
        self.sums, self.count, self.started = {}, 0, now
        return out


class ReconstructionImages:
    """original | masked input | reconstruction, for objectives with a `reconstruct` method.

    Uses the first `num_images` training images, the view's size and normalisation, no random
    crop, and a fixed mask, so the images of successive steps are comparable.
    """

    def __init__(self, config, model, views_fn, source, mesh):
        self.enabled = objectives.contract(model).reconstructs and config.num_images > 0
        self.every, self.skipped = config.image_every_steps, 0
        if not self.enabled:
            return
        # The first view's size and normalisation without its random ops; mean and std undo
        # the normalisation for display.
        view = augment.view_geometry(config.views[0], config.data.image_size)
        spec = "|".join([f"resize({(view.height, view.width)})", *view.normalize])
        display_fn = augment.build([spec])
        self.mean, self.std = (np.asarray(v, np.float32) for v in (view.mean, view.std))
        # Undecodable images are skipped and counted, as in the training batches.
        host, self.skipped = data.first_decodable(source, config.num_images)
        self.images = jax.device_put(host, sharding.replicated(mesh))
        key = jax.random.key(config.seed)

        def reconstruct(params, model_state, images):
            variables = {"params": params, **model_state}
            return model.apply(
                variables, display_fn(images, key), method="reconstruct", rngs={"mask": key}
            )

        self.fn = jax.jit(reconstruct, out_shardings=sharding.replicated(mesh))

    def due(self, step: int, at_end: bool) -> bool:
        return self.enabled and (at_end or (self.every > 0 and step % self.every == 0))

    def write(self, writer: logs.Writer, step: int, state) -> None:
        out = self.fn(state.params, state.model_state, self.images)
        order = [k for k in ("original", "masked", "reconstruction") if k in out]
        order += sorted(set(out) - set(order))  # jit returns dicts with sorted keys
        columns = {k: np.asarray(out[k]) * self.std + self.mean for k in order}
        writer.image(step, "reconstruction", logs.image_grid(columns))


class SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second SIGINT aborts."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
