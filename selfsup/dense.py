"""Dense layers whose matmuls are 2-D: [..., K] -> [M, K] @ [K, N] -> [..., N].

Linen's `Dense` contracts the last axis of a [B, T, K] (or [B, H, W, K]) input as it is, so its
kernel gradient contracts all the leading axes at once, and XLA:CPU transposes the incoming
gradient into an [N, M] copy fused with the elementwise backward before it (LayerNorm, GELU,
BatchNorm): a transposing loop over the step's largest activations. Flattening the leading axes
first gives the same values from plain 2-D dots; forward + backward on one core, a ViT MLP block
is 1.07-1.17x faster and a ResNet 1x1 conv + BatchNorm + ReLU 1.8-3.1x (BENCHMARKS.md, *2-D
dots*).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax


def flat_dot_general(
    lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
):
    """`lax.dot_general`, with lhs flattened to [M, K] when it contracts its last axis with a
    2-D rhs's first ([..., K] x [K, N] -> [..., N]); any other contraction as it is."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    flat = (
        lhs.ndim > 2
        and rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not lhs_batch
        and not rhs_batch
    )
    if not flat:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )
    out = jax.lax.dot_general(
        lhs.reshape(-1, lhs.shape[-1]),
        rhs,
        (((1,), (0,)), ((), ())),
        precision,
        preferred_element_type,
        **kwargs,
    )
    return out.reshape(*lhs.shape[:-1], rhs.shape[-1])


def matmul(x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
    """[..., K] @ [K, N] -> [..., N] as one 2-D dot."""
    return flat_dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)


# `nn.Dense` with the same parameters (names, shapes, initialisers), its matmul flattened.
Dense = functools.partial(nn.Dense, dot_general=flat_dot_general)
