"""BatchNorm (optionally with its ReLU); a drop-in for the `flax.linen.BatchNorm` the ResNets
use.

Same variables as Linen's (`params`: `scale`, `bias` [C]; `batch_stats`: `mean`, `var` [C],
the biased batch variance in the running average) and the same output; statistics over every
axis but the last, two-pass (mean, then the mean of squared deviations, as PyTorch and Linen's
`use_fast_variance=False`), over the positions where `mask` is True when one is given (SparK's
sparse BatchNorm), in float32 for any input dtype. With `relu=True` the layer returns
max(BN(x), 0), the conv-BN-ReLU unit's last two steps as one.

- Reference form: that formula and autodiff.
- CPU form: the same forward and the closed-form backward (n kept positions, m the mask,
  g' = g * [BN(x) > 0] with the ReLU, xhat recomputed from the saved x, mean, rstd behind an
  `optimization_barrier`):

      dx = rstd * scale * (g' - m / n * (sum(g') + xhat * sum(g' * xhat))),
      dscale = sum(g' * xhat),  dbias = sum(g'),

  sums over every position, masked ones included (their outputs still depend on the kept
  statistics). Autodiff leaves XLA:CPU a materialised x - mean in the forward and six passes in
  the backward per layer (BENCHMARKS.md, *BatchNorm*).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.ops.dispatch import choose


def _stats(x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 (mean, biased variance, kept count) over every axis but the last; mean and
    variance [C]."""
    axes = tuple(range(x.ndim - 1))
    if mask is None:
        count = jnp.asarray(x.size // x.shape[-1], jnp.float32)
        mean = x.sum(axes) / count
        centred = x - mean
        return mean, (centred * centred).sum(axes) / count, count
    m = jnp.broadcast_to(mask, x.shape[:-1] + (1,)).astype(jnp.float32)
    count = jnp.maximum(m.sum(), 1.0)
    mean = (x * m).sum(axes) / count
    centred = (x - mean) * m
    return mean, (centred * centred).sum(axes) / count, count


def batch_norm(x, scale, bias, mask, eps: float, relu: bool):
    """Training-mode BatchNorm (then ReLU if `relu`) over every axis but the last, statistics
    over `mask`'s True positions (None: all): x [..., C], scale and bias [C] -> (y [..., C] in
    x's dtype, batch mean [C], biased batch variance [C])."""
    masks = () if mask is None else (mask,)

    def reference(x, scale, bias, *masks):
        return reference_batch_norm(x, scale, bias, masks[0] if masks else None, eps, relu)

    def cpu(x, scale, bias, *masks):
        return _cpu_batch_norm(x, scale, bias, masks[0] if masks else None, eps, relu)

    return choose(cpu=cpu, reference=reference, name="batch_norm")(x, scale, bias, *masks)


def reference_batch_norm(x, scale, bias, mask, eps: float, relu: bool):
    xf = x.astype(jnp.float32)
    mean, var, _ = _stats(xf, mask)
    _, y = _normalise(xf, mean, jax.lax.rsqrt(var + eps), scale, bias, relu)
    return y.astype(x.dtype), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _cpu_batch_norm(x, scale, bias, mask, eps: float, relu: bool):
    """`batch_norm` whose statistics carry no gradient (the module stores them behind
    `stop_gradient`)."""
    return _forward(x, scale, bias, mask, eps, relu)[0]


def _normalise(xf, mean, rstd, scale, bias, relu):
    xhat = (xf - mean) * rstd
    y = xhat * scale + bias
    return xhat, jnp.maximum(y, 0.0) if relu else y


def _forward(x, scale, bias, mask, eps, relu):
    xf = x.astype(jnp.float32)
    mean, var, count = _stats(xf, mask)
    rstd = jax.lax.rsqrt(var + eps)
    _, y = _normalise(xf, mean, rstd, scale, bias, relu)
    return (y.astype(x.dtype), mean, var), (x, mean, rstd, scale, bias, mask, count)


def _backward(eps, relu, saved, grads):
    del eps
    x, mean, rstd, scale, bias, mask, count = jax.lax.optimization_barrier(saved)
    g = grads[0].astype(jnp.float32)  # the statistics' cotangents are zero (stop_gradient)
    xhat, y = _normalise(x.astype(jnp.float32), mean, rstd, scale, bias, relu)
    if relu:
        g = jnp.where(y > 0, g, 0.0)
    axes = tuple(range(x.ndim - 1))
    dbias, dscale = g.sum(axes), (g * xhat).sum(axes)
    kept = 1.0 if mask is None else jnp.broadcast_to(mask, x.shape[:-1] + (1,))
    correction = kept * (dbias + xhat * dscale) / count
    dx = rstd * scale * (g - correction)
    dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
    return dx.astype(x.dtype), dscale, dbias, dmask


_cpu_batch_norm.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis (optionally followed by ReLU): [..., C] -> [..., C].

    Training (`use_running_average=False`) normalises with the batch statistics (over `mask`'s
    True positions when given, broadcastable to [..., 1]) and updates the running averages:
    ra = momentum * ra + (1 - momentum) * batch; evaluation uses the running averages."""

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    relu: bool = False
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        if self.use_running_average:
            rstd = jax.lax.rsqrt(ra_var.value + self.epsilon)
            xf = x.astype(jnp.float32)
            _, y = _normalise(xf, ra_mean.value, rstd, scale, bias, self.relu)
            return y.astype(dtype)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
        y, mean, var = batch_norm(x, scale, bias, mask, self.epsilon, self.relu)
        if not self.is_initializing():
            mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(dtype)
