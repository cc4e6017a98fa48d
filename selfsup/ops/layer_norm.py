"""LayerNorm over the last axis; `LayerNorm` is a drop-in for `flax.linen.LayerNorm`.

Same parameters as Linen's (`scale` ones, `bias` zeros, float32, shape [C]) and the same
output; the statistics are two-pass (mean, then the mean of squared deviations, as PyTorch
computes them and Linen's `use_fast_variance=False`), in float32 for any input dtype.

- Reference form: that formula and autodiff.
- CPU form: the same forward and the closed-form backward

      dx = rstd * (g' - mean(g') - xhat * mean(g' * xhat)),  g' = g * scale,
      dscale = sum(g * xhat),  dbias = sum(g),

  with xhat recomputed from the saved x, mean and rstd behind an `optimization_barrier` (so XLA
  does not store the forward's xhat instead). Autodiff leaves XLA:CPU several reductions and a
  materialised broadcast of `scale` per layer (BENCHMARKS.md, *Elementwise work*).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.ops.dispatch import choose


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis; x [..., C], scale and
    bias [C]; returned in x's dtype."""
    return choose(
        cpu=lambda x, scale, bias: _cpu_layer_norm(x, scale, bias, eps),
        reference=functools.partial(reference_layer_norm, eps=eps),
        name="layer_norm",
    )(x, scale, bias)


def _stats(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """float32 mean and 1/sqrt(var + eps) over the last axis, each [..., 1]."""
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    return mean, jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)


def reference_layer_norm(x, scale, bias, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, eps)
    return ((xf - mean) * rstd * scale + bias).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_layer_norm(x, scale, bias, eps: float) -> jax.Array:
    return _forward(x, scale, bias, eps)[0]


def _forward(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, eps)
    y = (xf - mean) * rstd * scale + bias
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _backward(eps, saved, grad):
    del eps
    x, mean, rstd, scale = jax.lax.optimization_barrier(saved)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = grad.astype(jnp.float32)
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    leading = tuple(range(g.ndim - 1))
    return dx.astype(x.dtype), (g * xhat).sum(leading), g.sum(leading)


_cpu_layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
    """`layer_norm` with parameters `scale` and `bias` [C]; output in `dtype` (default, as
    Linen's: x's dtype promoted with the float32 parameters)."""

    epsilon: float = 1e-6
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon).astype(dtype)
