"""Exact GELU, x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), PyTorch's `F.gelu` (timm's MLP).

Computed in float32 for any input dtype, returned in the input's dtype.

- Reference form: `jax.nn.gelu(approximate=False)` and autodiff.
- CPU form: one pass over x with `erf`, and a hand-written backward that recomputes
  Phi(x) from x (d/dx = Phi(x) + x * phi(x)) behind an `optimization_barrier`, so XLA:CPU
  neither goes through `erfc` (several times the work of `erf`) nor stores `erf(...)` as one more
  activation-sized tensor (BENCHMARKS.md, *Elementwise work*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfsup.ops.dispatch import choose

SQRT_HALF = np.float32(np.sqrt(0.5))
INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, elementwise; any shape."""
    return choose(cpu=_cpu_gelu, reference=reference_gelu, name="gelu")(x)


def reference_gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _cdf(x: jax.Array) -> jax.Array:
    """Phi(x), the standard normal CDF."""
    return 0.5 * (1.0 + jax.lax.erf(x * SQRT_HALF))


@jax.custom_vjp
def _cpu_gelu(x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * _cdf(xf)).astype(x.dtype)


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _cpu_gelu(x), x


def _backward(x: jax.Array, grad: jax.Array) -> tuple[jax.Array]:
    xf = jax.lax.optimization_barrier(x).astype(jnp.float32)
    slope = _cdf(xf) + xf * INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
    return ((grad.astype(jnp.float32) * slope).astype(x.dtype),)


_cpu_gelu.defvjp(_forward, _backward)
