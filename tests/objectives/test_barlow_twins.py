"""Barlow Twins: the loss against a NumPy float64 reference written from the paper, the projector
against NumPy; 8 emulated devices against one (the test lightly#1977 would have failed); the
smoke config end to end with resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, numeric_grad

from selfsup import augment, objectives, optim
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.objectives import barlow_twins as bt
from selfsup.train import step as step_lib

VIT = {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2}

# ---------------------------------------------------------------- NumPy float64 references


def ref_cross_correlation(z1, z2):
    """The paper's Eq. 2: C_ij = sum_b za_bi zb_bj / sqrt(sum_b za_bi^2) / sqrt(sum_b zb_bj^2),
    each embedding mean-centred over the batch."""
    a = z1.astype(np.float64) - z1.mean(0)
    b = z2.astype(np.float64) - z2.mean(0)
    d = a.shape[1]
    c = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            c[i, j] = (a[:, i] * b[:, j]).sum() / np.sqrt(
                (a[:, i] ** 2).sum() * (b[:, j] ** 2).sum()
            )
    return c


def ref_loss(z1, z2, lambd):
    """The paper's Eq. 1: sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2."""
    c = ref_cross_correlation(z1, z2)
    d = len(c)
    invariance = sum((1 - c[i, i]) ** 2 for i in range(d))
    redundancy = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if j != i)
    return invariance + lambd * redundancy


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("n, d, lambd", [(16, 6, 0.0051), (5, 9, 0.5), (64, 3, 0.0)])
def test_loss_matches_the_paper(n, d, lambd):
    rng = np.random.default_rng(n)
    # Unit-scale embeddings: BatchNorm's eps (1e-5) is then far below the tolerance.
    z1 = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(size=d)
    z2 = 0.6 * z1 + rng.normal(size=(n, d))
    got = bt.barlow_twins_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), lambd)
    np.testing.assert_allclose(float(got), ref_loss(z1, z2, lambd), rtol=1e-4)
    c = bt.cross_correlation(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
    np.testing.assert_allclose(c, ref_cross_correlation(z1, z2), atol=1e-4)


def test_standardisation_is_batchnorm_without_affine():
    """Biased variance and eps 1e-5 inside the root: visible on small-variance features."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(8, 4)) * np.array([1.0, 1e-2, 3e-3, 1e-3])
    ref = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # np.var is the biased variance
    np.testing.assert_allclose(bt.standardize(jnp.asarray(z, jnp.float32)), ref, rtol=1e-4)


def test_gradient_matches_the_reference():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 6, 3))
    g1, g2 = jax.grad(bt.barlow_twins_loss, argnums=(0, 1))(
        jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.3
    )
    np.testing.assert_allclose(g1, numeric_grad(lambda z: ref_loss(z, z2, 0.3), z1), atol=2e-4)
    np.testing.assert_allclose(g2, numeric_grad(lambda z: ref_loss(z1, z, 0.3), z2), atol=2e-4)


# ---------------------------------------------------------------- the objective


def test_projector_matches_numpy_and_views_are_normalised_separately():
    model = objectives.build({"name": "barlow_twins", "projector": (24, 24, 16)}, VIT)
    rng = np.random.default_rng(3)
    x1, x2 = (jnp.asarray(v) for v in rng.uniform(size=(2, 6, 16, 16, 3)).astype(np.float32))
    variables = jax.jit(lambda: model.init(jax.random.key(0), (x1, x2), train=False))()
    p = variables["params"]["head"]
    assert [p[f"linear_{i}"]["kernel"].shape for i in range(3)] == [(32, 24), (24, 24), (24, 16)]
    assert set(p) == {"linear_0", "bn_0", "linear_1", "bn_1", "linear_2"}  # no biases, no bn_2
    # PyTorch's nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    assert np.abs(np.asarray(p["linear_0"]["kernel"])).max() <= 1 / np.sqrt(32)

    def ref_projector(x):
        x = np.asarray(x, np.float64)
        for i in range(2):
            x = x @ np.asarray(p[f"linear_{i}"]["kernel"], np.float64)
            mean, var = x.mean(0), x.var(0)  # training-mode BN over this view's batch
            bn = p[f"bn_{i}"]
            x = np.maximum((x - mean) / np.sqrt(var + 1e-5) * bn["scale"] + bn["bias"], 0.0)
        return x @ np.asarray(p["linear_2"]["kernel"], np.float64)

    backbone = jax.jit(lambda x: model.apply(variables, x, method=lambda m, im: m.backbone(im)))
    pooled = [backbone(x).pooled for x in (x1, x2)]
    step = jax.jit(lambda v: model.apply(v, (x1, x2), train=True, mutable=["batch_stats"]))
    (loss, metrics), updates = step(variables)
    z1, z2 = ref_projector(pooled[0]), ref_projector(pooled[1])
    np.testing.assert_allclose(float(loss), ref_loss(z1, z2, 0.0051), rtol=1e-4)
    assert float(metrics["on_diag"]) + 0.0051 * float(metrics["off_diag"]) == pytest.approx(
        float(loss), rel=1e-6
    )
    # Two BN updates per step (one per view), flax momentum 0.9 from mean 0.
    x = np.asarray(pooled[0], np.float64) @ np.asarray(p["linear_0"]["kernel"], np.float64)
    y = np.asarray(pooled[1], np.float64) @ np.asarray(p["linear_0"]["kernel"], np.float64)
    expect = 0.9 * (0.1 * x.mean(0)) + 0.1 * y.mean(0)
    np.testing.assert_allclose(updates["batch_stats"]["head"]["bn_0"]["mean"], expect, atol=1e-5)


def test_bad_settings_are_user_errors():
    for projector in ((), (8, 0), "8192-8192"):
        with pytest.raises(UserError, match="projector"):
            objectives.build({"name": "barlow_twins", "projector": projector}, VIT)
    with pytest.raises(UserError, match="lambd"):
        objectives.build({"name": "barlow_twins", "lambd": -1.0}, VIT)


# ---------------------------------------------------------------- 8 devices = 1 device

EIGHT_DEVICES = r"""
import json, jax, numpy as np, jax.numpy as jnp, optax
from selfsup import objectives
from selfsup.train import loop, monitors, step as step_lib
from selfsup.parallel import sharding
from selfsup import pytree
from selfsup.train import state as state_lib

model = objectives.build(OBJECTIVE, BACKBONE)
# Fixed views go into the step as they are (the augmentation is not what this compares).
# Blocky random images: distinct samples, so the batch statistics are well conditioned.
cells = np.random.default_rng(0).uniform(size=(16, 2, 4, 4, 3))
stacked = cells.repeat(8, axis=2).repeat(8, axis=3).astype(np.float32)
views_fn = lambda x, key: (x[:, 0], x[:, 1])
example = (jnp.zeros((2, 32, 32, 3)),) * 2
one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
state, _ = state_lib.create(model, optax.sgd(0.1), example, 0, one, ())
host = jax.tree.map(np.asarray, state)
out = {}
for name, mesh in [("one", one), ("eight", sharding.make_mesh({"data": 4, "fsdp": 2}))]:
    placed = jax.device_put(host, sharding.tree_shardings(host, mesh, [(".*", "fsdp")]))
    batch = {"image": jax.device_put(stacked, sharding.batch_sharding(mesh))}
    loss, _, grads, updates = jax.jit(step_lib.make_grad_fn(model, views_fn, seed=0))(placed, batch)
    flat = lambda t: {pytree.path_str(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_leaves_with_path(t)}
    out[name] = (float(loss), flat(grads), flat(updates))
(l1, g1, u1), (l8, g8, u8) = out["one"], out["eight"]
# Each leaf relative to its largest entry, or to 1% of the largest over all leaves for leaves
# whose gradient is zero in exact arithmetic (the backbone's last norm bias, cancelled by the
# projector's Dense-without-bias + BatchNorm) and only float noise here.
def rel(a, b):
    floor = 1e-2 * max(float(np.abs(v).max()) for v in a.values())
    return max(float(np.abs(a[k] - b[k]).max()) / max(float(np.abs(a[k]).max()), floor) for k in a)
print(json.dumps({"loss": [l1, l8], "grad_err": rel(g1, g8), "state_err": rel(u1, u8),
                  "grad_norm": float(np.sqrt(sum((g ** 2).sum() for g in g1.values()))),
                  "state_leaves": len(u1)}))
"""

_OBJECTIVE = {"name": "barlow_twins", "projector": (32, 32, 32)}
EIGHT_DEVICE_CHECKS = {
    "barlow_twins": f"OBJECTIVE, BACKBONE = {_OBJECTIVE!r}, {VIT!r}\n" + EIGHT_DEVICES
}


def test_eight_devices_give_the_loss_gradients_and_bn_statistics_of_one(eight_devices):
    out = json.loads(eight_devices("barlow_twins"))
    one, eight = out["loss"]
    assert np.isfinite(one) and out["grad_norm"] > 0
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    # Relative to each leaf's largest gradient: a 1/8 (or 8x) factor would show as ~0.9 (7).
    assert out["grad_err"] < 1e-4, out
    assert out["state_err"] < 1e-4 and out["state_leaves"] > 0, out


# ---------------------------------------------------------------- configs


def test_recipe_config_builds_with_the_papers_learning_rates():
    config = config_lib.resolve(config_lib.load(str(REPO / "configs/barlow_twins_resnet_in1k.py")))
    model = step_lib.build_model(config)
    assert model.projector == (8192, 8192, 8192) and model.lambd == 0.0051
    assert model.backbone.variant == "50" and model.backbone.zero_init_last_bn
    uint8 = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.uint8)
    views = jax.eval_shape(augment.build(config.views), uint8, jax.random.key(0))
    assert [v.shape for v in views] == [(1, 224, 224, 3)] * 2
    assert config.views[0] != config.views[1]  # asymmetric blur / solarize
    no_warmup = {**config.optim.to_dict(), "warmup_epochs": 0.0}
    _, schedule = optim.build(no_warmup, batch_size=config.batch_size, total_steps=100)
    peak = 0.2 * 2048 / 256
    np.testing.assert_allclose(float(schedule(0)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.001 * peak, rtol=1e-5)
    # Biases and BN parameters: 0.0048 x batch / 256.
    mults = dict(config.optim.lr_mults)
    np.testing.assert_allclose(peak * mults[r".*/bias$"], 0.0048 * 2048 / 256, rtol=1e-9)
    np.testing.assert_allclose(peak * mults[r".*/scale$"], 0.0048 * 2048 / 256, rtol=1e-9)
