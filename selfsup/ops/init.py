"""PyTorch's default initialisation of Linear and Conv layers, for heads ported from PyTorch code
that keeps it.

PyTorch draws a Linear / ConvNd weight with `kaiming_uniform_(a=sqrt(5))` and its bias from
U(-1/sqrt(fan_in), 1/sqrt(fan_in)): both are U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
in_features (Linear) or in_channels / groups * prod(kernel_size) (Conv).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_default_init(fan_in: int) -> Callable[..., jax.Array]:
    """`init(key, shape, dtype=float32)` drawing U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's
    default for the weight and the bias of a layer with this fan_in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# The same distribution for a kernel [..., fan_in, out], fan_in read off its shape (a bias has
# none). flax's variance_scaling draws U(-1, 1) x bound: from the same key, other values than
# `torch_default_init(fan_in)`, so the SwAV and Barlow Twins projectors keep this form and start
# from the values they always had.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
