"""Scaling vectors to unit L2 norm (one form: plain JAX, on every platform)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize; same shape as x.

    `eps` bounds the norm. tf.math.l2_normalize's epsilon bounds the squared norm instead: its
    default 1e-12 is eps=1e-6 here (SimCLR's official code uses it).
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)
