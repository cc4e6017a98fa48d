"""selfsup.ops.attention in both forms: softmax attention from a fused qkv against NumPy float64
(values) and float64 central differences (gradients), with and without a mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numeric_grad, numpy_attention

from selfsup.backbones.vit import prefix_causal_mask
from selfsup.ops import attention

B, T, N, H = 2, 5, 2, 3


@pytest.mark.parametrize("masked", [False, True])
def test_attention_and_its_gradient_match_numpy_float64(masked, ops_form):
    rng = np.random.default_rng(int(masked))
    qkv = rng.normal(size=(B, T, 3, N, H))
    w = rng.normal(size=(B, T, N, H))
    # Prefix-causal (AIM), one prefix per sample: [B, 1, T, T].
    mask = np.asarray(prefix_causal_mask(T, np.array([1, 3])))[:, None] if masked else None
    jmask = None if mask is None else jnp.asarray(mask)
    qkv32 = jnp.asarray(qkv, jnp.float32)
    np.testing.assert_allclose(
        attention(qkv32, jmask), numpy_attention(qkv, mask), rtol=1e-5, atol=1e-5
    )
    grad = jax.jit(jax.grad(lambda x: jnp.sum(attention(x, jmask) * w)))(qkv32)
    want = numeric_grad(lambda x: np.sum(numpy_attention(x, mask) * w), qkv)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-5)


def test_bfloat16_attention_returns_bfloat16_close_to_float32(ops_form):
    qkv = jax.random.normal(jax.random.key(0), (B, T, 3, N, H))
    out = attention(qkv.astype(jnp.bfloat16))
    grad = jax.grad(lambda x: jnp.sum(attention(x)).astype(jnp.float32))(qkv.astype(jnp.bfloat16))
    assert out.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), attention(qkv), atol=3e-2)
