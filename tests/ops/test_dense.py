"""selfsup.ops.Dense: Linen's Dense against NumPy float64 in both forms; the CPU form's matmul is
one 2-D dot."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup.ops import dense


def dot_lhs_ranks(fn, *args) -> list[int]:
    """The lhs rank of every dot_general in fn's forward and backward program."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    ranks = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                ranks.append(eqn.invars[0].aval.ndim)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return ranks


@pytest.mark.parametrize("shape", [(2, 5, 6), (2, 3, 4, 6), (4, 6)])
def test_dense_equals_numpy_with_linen_parameters_and_2d_dots(shape, ops_form):
    rng = np.random.default_rng(len(shape))
    x = rng.normal(size=shape)
    layer = dense.Dense(7)
    params = layer.init(jax.random.key(0), jnp.zeros(shape, jnp.float32))
    assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (6, 7), "bias": (7,)}}
    kernel, bias = (np.asarray(params["params"][k], np.float64) for k in ("kernel", "bias"))
    g = rng.normal(size=(*shape[:-1], 7))

    def loss(params, x):
        return jnp.sum(layer.apply(params, x) * g)

    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(layer.apply(params, x32), x @ kernel + bias, rtol=1e-5, atol=1e-5)
    grads, dx = jax.grad(loss, (0, 1))(params, x32)
    flat_x, flat_g = x.reshape(-1, 6), g.reshape(-1, 7)
    np.testing.assert_allclose(grads["params"]["kernel"], flat_x.T @ flat_g, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["params"]["bias"], flat_g.sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g @ kernel.T, rtol=1e-5, atol=1e-5)
    # In the CPU form, forward and both gradient products are plain 2-D dots, whatever the
    # input's rank; the reference form contracts the input as it is.
    ranks = [2, 2, 2] if ops_form == "cpu" else [len(shape)] * 3
    assert dot_lhs_ranks(jax.grad(loss, (0, 1)), params, x32) == ranks


def test_other_contractions_are_left_as_they_are(ops_form):
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(
        dense.dot_general(a, b, batched), jax.lax.dot_general(a, b, batched)
    )
    assert dot_lhs_ranks(lambda a, b: dense.dot_general(a, b, batched), a, b) == [3]
