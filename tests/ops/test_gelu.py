"""selfsup.ops.gelu: exact GELU and its gradient against NumPy float64, in both forms."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from conftest import numpy_gelu

from selfsup.ops import gelu


def numpy_gelu_and_slope(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x * Phi(x) and its derivative Phi(x) + x * phi(x), float64."""
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return numpy_gelu(x), cdf + x * pdf


def test_gelu_and_its_gradient_match_numpy_float64(ops_form):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=500) * 3.0, [-12.0, -6.0, -1e-3, 0.0, 1e-3, 6.0, 12.0]])
    w = rng.normal(size=x.shape)
    value, slope = numpy_gelu_and_slope(x)
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(gelu(x32), value, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(gelu(x) * w))(x32)
    np.testing.assert_allclose(grad, w * slope, rtol=1e-5, atol=1e-6)
    # The tanh approximation differs from the exact GELU by up to ~1e-3 near |x| = 2.
    assert float(jnp.max(jnp.abs(jax.nn.gelu(x32, approximate=True) - gelu(x32)))) > 1e-4


def test_gelu_keeps_the_input_dtype_and_computes_in_float32(ops_form):
    x = jnp.linspace(-4.0, 4.0, 33, dtype=jnp.bfloat16)
    y = gelu(x)
    grad = jax.grad(lambda x: jnp.sum(gelu(x)).astype(jnp.float32))(x)
    assert y.dtype == grad.dtype == jnp.bfloat16
    value, slope = numpy_gelu_and_slope(np.asarray(x, np.float64))
    np.testing.assert_allclose(np.asarray(y, np.float64), value, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(grad, np.float64), slope, rtol=1e-2, atol=1e-2)
