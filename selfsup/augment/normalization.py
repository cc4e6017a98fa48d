"""Per-channel normalisation of views: the `normalize` op and ImageNet's statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# The colour and filter ops register themselves in OPS (after everything they import from here).
from selfsup.augment.registry import Op, register
from selfsup.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register("normalize")
def normalize(mean: Any = "imagenet", std: Any = None) -> Op:
    """(x - mean) / std per channel. mean "imagenet" uses ImageNet's mean and std; "none" (or
    "identity") keeps [0, 1] inputs; otherwise mean and std are numbers or per-channel tuples."""
    if isinstance(mean, str):
        if std is not None or mean not in ("imagenet", "none", "identity"):
            raise UserError(
                f"normalize: use 'imagenet', 'none', or numeric mean and std; got mean={mean!r}, "
                f"std={std!r}"
            )
        if mean != "imagenet":
            return lambda images, rng: images
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    mean_a, std_a = _channels(mean, "mean"), _channels(std, "std")
    if any(s <= 0 for s in std_a):
        raise UserError(f"normalize: std must be positive, got {std!r}")

    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        channels = images.shape[-1]
        if {len(mean_a), len(std_a)} - {1, channels}:
            raise UserError(
                f"normalize: mean and std need 1 or {channels} values, got {mean!r} and {std!r}"
            )
        return (images - jnp.asarray(mean_a, jnp.float32)) / jnp.asarray(std_a, jnp.float32)

    return fn


def _channels(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),)
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return tuple(float(v) for v in value)
    raise UserError(f"normalize: {name} must be a number or a tuple of numbers, got {value!r}")
