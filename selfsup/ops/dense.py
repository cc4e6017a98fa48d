"""Dense layers: `Dense` is `nn.Dense` with the same parameters, its matmul through
`dot_general`.

- Reference form: `lax.dot_general` as it is.
- CPU form: a [..., K] x [K, N] contraction as a 2-D dot, [M, K] @ [K, N] -> [..., N]. A
  [B, T, K] input contracted as it is makes the kernel gradient contract all leading axes at
  once, and XLA:CPU then transposes the incoming gradient into an [N, M] copy fused with the
  elementwise backward before it (LayerNorm, GELU, BatchNorm): a transposing loop over the
  step's largest activations. Flattened first, the same values come from plain 2-D dots
  (BENCHMARKS.md, *2-D dots*).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from selfsup.ops.dispatch import choose


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """`lax.dot_general`; drop-in for Linen's `dot_general` argument."""

    def reference(lhs, rhs):
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )

    def cpu(lhs, rhs):
        return _flat_dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs
        )

    return choose(cpu=cpu, reference=reference, name="dot_general")(lhs, rhs)


def _flat_dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type, **kwargs):
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
    """[..., K] @ [K, N] -> [..., N]."""
    return dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), **kwargs)


def flat_matmul(x: jax.Array, kernel: jax.Array, precision=None, preferred_element_type=None):
    """`matmul`'s CPU form, one 2-D dot, for the CPU forms of other ops (no dispatch)."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return _flat_dot_general(x, kernel, dims, precision, preferred_element_type)


# `nn.Dense` with the same parameters (names, shapes, initialisers), its matmul `dot_general`.
Dense = functools.partial(nn.Dense, dot_general=dot_general)
