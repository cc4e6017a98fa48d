"""selfsup.ops.BatchNorm in both forms: values, running statistics and gradients against NumPy
float64 (gradients by central differences), with and without the ReLU and SparK's keep mask;
variables and outputs as Linen's BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numeric_grad

from selfsup.ops import BatchNorm

EPS, MOMENTUM = 1e-5, 0.9
SHAPE = (3, 4, 4, 5)  # [B, H, W, C]


def numpy_batch_norm(x, scale, bias, mask=None, relu=False):
    """(y, batch mean, biased batch variance) over every axis but the last, over `mask`'s
    True positions ([B, H, W, 1]) when given; all positions are normalised."""
    x = np.asarray(x, np.float64)
    m = np.ones(x.shape[:-1] + (1,)) if mask is None else np.asarray(mask, np.float64)
    n = m.sum()
    mean = (x * m).sum((0, 1, 2)) / n
    var = (((x - mean) * m) ** 2).sum((0, 1, 2)) / n
    y = (x - mean) / np.sqrt(var + EPS) * scale + bias
    return (np.maximum(y, 0.0) if relu else y), mean, var


def _inputs(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=SHAPE) * 2.0 + 0.7
    scale, bias = rng.normal(size=SHAPE[-1]), rng.normal(size=SHAPE[-1]) * 0.5
    mask = rng.random(SHAPE[:-1] + (1,)) > 0.4
    return x, scale, bias, mask, rng.normal(size=SHAPE)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_values_statistics_and_gradients_match_numpy_float64(relu, masked, ops_form):
    x, scale, bias, mask, w = _inputs(2 * relu + masked)
    mask = mask if masked else None
    ra_mean, ra_var = np.full(SHAPE[-1], 0.3), np.full(SHAPE[-1], 2.0)
    variables = {
        "params": {
            "scale": jnp.asarray(scale, jnp.float32),
            "bias": jnp.asarray(bias, jnp.float32),
        },
        "batch_stats": {
            "mean": jnp.asarray(ra_mean, jnp.float32),
            "var": jnp.asarray(ra_var, jnp.float32),
        },
    }
    layer = BatchNorm(momentum=MOMENTUM, epsilon=EPS, relu=relu)

    def loss(params, x):
        y, updates = layer.apply(
            {**variables, "params": params}, x, mask=mask, mutable=["batch_stats"]
        )
        return jnp.sum(y * w), (y, updates["batch_stats"])

    (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
        variables["params"], jnp.asarray(x, jnp.float32)
    )
    want_y, mean, var = numpy_batch_norm(x, scale, bias, mask, relu)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], MOMENTUM * ra_mean + (1 - MOMENTUM) * mean, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], MOMENTUM * ra_var + (1 - MOMENTUM) * var, rtol=1e-5)

    def f(x=x, scale=scale, bias=bias):
        return np.sum(numpy_batch_norm(x, scale, bias, mask, relu)[0] * w)

    expected = (
        numeric_grad(lambda s: f(scale=s), scale),
        numeric_grad(lambda b: f(bias=b), bias),
        numeric_grad(lambda x: f(x=x), x),
    )
    got = (grads[0]["scale"], grads[0]["bias"], grads[1])
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    if masked:  # masked positions are normalised too, and their gradient reaches the kept ones
        assert np.abs(np.asarray(grads[1])[~np.broadcast_to(mask, SHAPE)]).max() > 1e-3


def test_evaluation_uses_the_running_averages(ops_form):
    x, scale, bias, _, _ = _inputs(7)
    stats = {"mean": np.linspace(-1.0, 1.0, SHAPE[-1]), "var": np.linspace(0.5, 3.0, SHAPE[-1])}
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32),
        {"params": {"scale": scale, "bias": bias}, "batch_stats": stats},
    )
    y = BatchNorm(use_running_average=True, epsilon=EPS, relu=True).apply(
        variables, jnp.asarray(x, jnp.float32)
    )
    want = (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * scale + bias
    np.testing.assert_allclose(y, np.maximum(want, 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_module_has_linens_variables_output_and_gradients(masked, ops_form):
    x, _, _, mask, w = _inputs(11)
    x = jnp.asarray(x, jnp.float32)
    mask = mask if masked else None
    ours = BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    linen = nn.BatchNorm(
        use_running_average=False, momentum=MOMENTUM, epsilon=EPS, use_fast_variance=False
    )
    variables = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, linen.init(jax.random.key(0), x)
    )
    variables = {
        **variables,
        "params": jax.tree.map(
            lambda p: p + jax.random.normal(jax.random.key(1), p.shape), variables["params"]
        ),
    }

    def run(module, params):
        y, updates = module.apply(
            {**variables, "params": params}, x, mask=mask, mutable=["batch_stats"]
        )
        return jnp.sum(y * w), (y, updates)

    (_, (y0, s0)), g0 = jax.value_and_grad(lambda p: run(ours, p), has_aux=True)(
        variables["params"]
    )
    (_, (y1, s1)), g1 = jax.value_and_grad(lambda p: run(linen, p), has_aux=True)(
        variables["params"]
    )
    for a, b in zip(jax.tree.leaves((y0, s0, g0)), jax.tree.leaves((y1, s1, g1)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_bfloat16_input_gives_bfloat16_output_and_gradient(ops_form):
    x, scale, bias, _, _ = _inputs(13)
    variables = BatchNorm().init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    layer = BatchNorm(dtype=jnp.bfloat16, relu=True)
    xb = jnp.asarray(x, jnp.bfloat16)
    y, _ = layer.apply(variables, xb, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    want = numpy_batch_norm(np.asarray(xb, np.float64), 1.0, 0.0, relu=True)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=0.05)
    dx = jax.grad(lambda x: jnp.sum(layer.apply(variables, x, mutable=["batch_stats"])[0]))(xb)
    assert dx.dtype == jnp.bfloat16
