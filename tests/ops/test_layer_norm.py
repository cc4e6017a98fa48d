"""selfsup.ops.layer_norm in both forms: values against NumPy float64, gradients against
float64 central differences, parameters and outputs as Linen's LayerNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numeric_grad, numpy_layer_norm

from selfsup.ops import LayerNorm, layer_norm

EPS = 1e-6


@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 8)])
def test_layer_norm_and_its_gradients_match_numpy_float64(shape, ops_form):
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape) * 2.0 + 0.5
    scale, bias = rng.normal(size=8), rng.normal(size=8)
    w = rng.normal(size=shape)
    args32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    np.testing.assert_allclose(
        layer_norm(*args32, EPS), numpy_layer_norm(x, scale, bias, EPS), rtol=1e-5, atol=1e-5
    )
    grads = jax.grad(lambda x, s, b: jnp.sum(layer_norm(x, s, b, EPS) * w), (0, 1, 2))(*args32)
    expected = (
        numeric_grad(lambda x: np.sum(numpy_layer_norm(x, scale, bias, EPS) * w), x),
        numeric_grad(lambda s: np.sum(numpy_layer_norm(x, s, bias, EPS) * w), scale),
        numeric_grad(lambda b: np.sum(numpy_layer_norm(x, scale, b, EPS) * w), bias),
    )
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_module_has_linens_parameters_and_output(ops_form):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3.0 + 1.0
    ours, linen = LayerNorm(1e-6), nn.LayerNorm(1e-6)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(
        jnp.shape, linen.init(jax.random.key(1), x)
    )
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), linen.apply(params, x), atol=2e-5)
    # Output dtype as Linen's: `dtype` when given, else x's promoted with float32.
    xb = x.astype(jnp.bfloat16)
    assert LayerNorm(1e-6, jnp.bfloat16).apply(params, xb).dtype == jnp.bfloat16
    assert ours.apply(params, xb).dtype == nn.LayerNorm(1e-6).apply(params, xb).dtype
    dx = jax.grad(lambda x: jnp.sum(LayerNorm(1e-6, jnp.bfloat16).apply(params, x)))(xb)
    assert dx.dtype == jnp.bfloat16
