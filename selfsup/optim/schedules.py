"""Learning-rate schedules: the linear scaling rule, linear warmup, then constant or cosine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Schedule = Callable[[Any], jax.Array]
SCHEDULES = ("cosine", "constant")


def scaled_lr(base_lr: float, batch_size: int, divisor: int) -> float:
    """The paper's linear scaling rule: base_lr * batch_size / divisor (divisor 0: base_lr)."""
    return base_lr * batch_size / divisor if divisor else base_lr


def make_schedule(
    kind: str, peak: float, *, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> Schedule:
    """lr(step): linear warmup from 0 to `peak` over `warmup_steps`, then `peak` ("constant") or
    a half-cycle cosine from `peak` at the end of warmup to `min_lr` at `total_steps` ("cosine";
    held at min_lr after). Works on traced steps."""
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        if kind == "constant":
            after = jnp.asarray(peak, jnp.float32)
        else:
            progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
            # 0.5 * (1 + cos(pi p)) written as cos(pi p / 2)^2: no cancellation near the end.
            after = min_lr + (peak - min_lr) * jnp.cos(0.5 * jnp.pi * progress) ** 2
        return jnp.where(step < warmup_steps, warm, after)

    return schedule
