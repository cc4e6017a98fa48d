"""l2_normalize against NumPy float64: torch.nn.functional.normalize, and tf.math.l2_normalize
with eps=1e-6."""

import jax.numpy as jnp
import numpy as np
import pytest

from selfsup import ops


def ref_torch(x, axis, eps):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def ref_tf(x, axis, epsilon=1e-12):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.maximum(np.sum(x * x, axis=axis, keepdims=True), epsilon))


@pytest.mark.parametrize("axis", [-1, 0])
def test_l2_normalize_matches_references(axis):
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    x[1] = 0.0  # a zero vector stays zero
    x[2] = 1e-8  # below the floor: scaled by 1 / eps, not to unit norm
    got = ops.l2_normalize(jnp.asarray(x), axis=axis)
    np.testing.assert_allclose(got, ref_torch(x, axis, 1e-12), rtol=1e-6)
    got = ops.l2_normalize(jnp.asarray(x), axis=axis, eps=1e-6)
    np.testing.assert_allclose(got, ref_tf(x, axis), rtol=1e-6)
    if axis == -1:
        np.testing.assert_allclose(np.linalg.norm(np.asarray(got)[3:], axis=-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(got)[2], 1e-8 / 1e-6, rtol=1e-6)
