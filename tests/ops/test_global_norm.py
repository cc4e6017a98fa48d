"""selfsup.ops.global_norm against NumPy float64, in both forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import ops


def test_global_norm_matches_numpy_float64(ops_form):
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5), rng.normal(size=(2, 2, 2))]}
    want = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(tree)))
    got = jax.jit(ops.global_norm)(jax.tree.map(lambda x: x.astype(np.float32), tree))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    bf16 = ops.global_norm(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree))
    assert bf16.dtype == jnp.float32  # squares summed in float32 whatever the leaves' dtype
    np.testing.assert_allclose(bf16, want, rtol=1e-2)
