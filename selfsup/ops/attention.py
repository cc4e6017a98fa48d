"""Multi-head softmax attention from the fused qkv projection: [B, T, 3, N, H] -> [B, T, N, H].

- Reference form: `jax.nn.dot_product_attention` (the fused kernels on GPU and TPU) and
  autodiff.
- CPU form: the same softmax(q k^T / sqrt(H) + mask) v with batch-leading dots ([B, N, T, H])
  and a hand-written backward that writes the qkv gradient as one [B, T, 3, N, H] stack:
  autodiff of `dot_product_attention` leaves XLA:CPU transposes around every attention dot,
  three padded copies of the q, k and v gradients summed into two layouts of the qkv gradient,
  and a materialised broadcast in the softmax (BENCHMARKS.md, *Elementwise work*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfsup.ops.dispatch import choose


def attention(qkv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """qkv [B, T, 3, N, H] (q, k, v along axis 2); mask: bool broadcastable to [B, N, T, T],
    True = may attend. Returns [B, T, N, H]."""

    def reference(qkv):
        return reference_attention(qkv, mask)

    def cpu(qkv):
        bias = None if mask is None else jnp.where(mask, 0.0, -1e30).astype(jnp.float32)
        return _softmax_attention(qkv, bias)

    return choose(cpu=cpu, reference=reference, name="attention")(qkv)


def reference_attention(qkv: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    q, k, v = jnp.moveaxis(qkv, 2, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _heads_first(x: jax.Array) -> jax.Array:
    """[B, T, N, H] <-> [B, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def _split(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T, 3, N, H] -> q, k, v, each [B, N, T, H]."""
    return tuple(_heads_first(qkv[:, :, i]) for i in range(3))


@jax.custom_vjp
def _softmax_attention(qkv: jax.Array, bias: jax.Array | None) -> jax.Array:
    """softmax(q k^T / sqrt(H) + bias) v; qkv [B, T, 3, N, H], bias float32 broadcastable to
    [B, N, T, T] or None -> [B, T, N, H]. Logits and softmax in float32; the bias (made
    from a bool mask) gets no gradient."""
    return _forward(qkv, bias)[0]


def _forward(qkv, bias):
    q, k, v = _split(qkv)
    scale = np.float32(qkv.shape[-1] ** -0.5)
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits if bias is None else logits + bias, axis=-1)
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), v)
    return _heads_first(out), (qkv, probs, bias)


def _backward(saved, grad):
    qkv, probs, bias = saved
    q, k, v = _split(qkv)
    scale = np.float32(qkv.shape[-1] ** -0.5)
    grad = _heads_first(grad)
    dv = jnp.einsum("bnts,bnth->bnsh", probs.astype(grad.dtype), grad)
    dprobs = jnp.einsum("bnth,bnsh->bnts", grad, v, preferred_element_type=jnp.float32)
    # d(q k^T): the softmax backward, times the logits' scale.
    dscores = probs * (dprobs - jnp.sum(probs * dprobs, -1, keepdims=True)) * scale
    dq = jnp.einsum("bnts,bnsh->bnth", dscores.astype(k.dtype), k)
    dk = jnp.einsum("bnts,bnth->bnsh", dscores.astype(q.dtype), q)
    dqkv = jnp.stack([_heads_first(dq), _heads_first(dk), _heads_first(dv)], axis=2)
    return dqkv.astype(qkv.dtype), None if bias is None else jnp.zeros_like(bias)


_softmax_attention.defvjp(_forward, _backward)
