"""The mesh, parameter placement, and one train step on 8 emulated devices equal to one device."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from selfsup.errors import UserError
from selfsup.parallel import sharding


def test_fsdp_spec_shards_the_largest_divisible_dim():
    assert sharding.fsdp_spec((192, 576), 4) == P(None, "fsdp")
    assert sharding.fsdp_spec((576, 190), 4) == P("fsdp", None)
    assert sharding.fsdp_spec((3, 5), 4) == P()
    assert sharding.fsdp_spec((64, 64), 1) == P()


def test_rules_first_match_wins_and_unmatched_is_replicated():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    tree = {"a": {"kernel": np.zeros((4, 8))}, "b": np.zeros((8,))}
    out = sharding.tree_shardings(tree, mesh, [("a/.*", (None, "fsdp")), (".*", "fsdp")])
    assert out["a"]["kernel"].spec == P(None, "fsdp")
    out = sharding.tree_shardings(tree, mesh, [("a/.*", "replicate")])
    assert out["b"].spec == P()


def test_mesh_errors_name_the_problem():
    with pytest.raises(UserError, match="needs 8 devices"):
        sharding.make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(UserError, match="unknown axis 'model'"):
        sharding.make_mesh({"model": 2})
    assert dict(sharding.make_mesh({"data": -1, "fsdp": 1}).shape) == {
        "data": len(jax.devices()),
        "fsdp": 1,
    }


EIGHT_DEVICES = r"""
import json, jax, numpy as np, jax.numpy as jnp
from selfsup import config as C, optim, augment, data
from selfsup.train import loop, monitors, step as step_lib
from selfsup.train import state as S
from selfsup.parallel import sharding
from selfsup import pytree

cfg = C.resolve(C.load("configs/quickstart.py:smoke"), {"batch_size": "16"})
model = step_lib.build_model(cfg)
views_fn = augment.build(cfg.views)
tx, schedule = optim.build(cfg.optim, batch_size=16, total_steps=4)
source = data.build_source(cfg.data, "train")
images = np.stack([source[i][0] for i in range(16)])
example = tuple(jnp.zeros(v.shape, v.dtype) for v in jax.eval_shape(
    views_fn, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8), jax.random.key(0)))
results = {}
for name, shape, devices in [("one", {"data": 1, "fsdp": 1}, jax.devices()[:1]),
                             ("eight", {"data": 2, "fsdp": 4}, jax.devices())]:
    mesh = sharding.make_mesh(shape, devices)
    state, shardings = S.create(model, tx, example, cfg.seed, mesh, cfg.param_sharding)
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
    grad_fn = jax.jit(step_lib.make_grad_fn(model, views_fn, cfg.seed))
    loss, _, grads, _ = grad_fn(state, batch)
    train_step = step_lib.make_train_step(model, tx, views_fn, cfg.seed, schedule)
    step = jax.jit(train_step, donate_argnums=0)
    state, _ = step(state, batch)
    specs = {pytree.path_str(p): str(l.sharding.spec) for p, l in
             jax.tree_util.tree_leaves_with_path(state.params)}
    results[name] = (loss, grads, state.params, specs, sharding.bytes_per_device(state.params))
(l1, g1, p1, _, b1), (l8, g8, p8, specs, b8) = results["one"], results["eight"]
def flat(tree):
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {pytree.path_str(p): np.asarray(v) for p, v in leaves}

g1, g8, p1, p8 = flat(g1), flat(g8), flat(p1), flat(p8)
print(json.dumps({
    "loss": [float(l1), float(l8)],
    "grad_err": max(float(np.abs(g1[k] - g8[k]).max() / (np.abs(g1[k]).max() + 1e-12)) for k in g1),
    "param_err": max(float(np.max(np.abs(p1[k] - p8[k]))) for k in p1),
    "sharded": sorted(k for k, s in specs.items() if "fsdp" in s),
    "bytes": [b1, b8],
    "leaves": len(g1),
}))
"""

EIGHT_DEVICE_CHECKS = {"sharding_fsdp_step": EIGHT_DEVICES}


def test_eight_devices_give_the_same_loss_gradients_and_step_as_one(eight_devices):
    out = json.loads(eight_devices("sharding_fsdp_step"))
    one, eight = out["loss"]
    assert np.isfinite(one)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert out["grad_err"] < 1e-4, out  # relative to each leaf's largest gradient
    assert out["param_err"] < 1e-5, out
    # FSDP really shards: the big kernels are split over the fsdp axis, memory shrinks.
    assert any("qkv/kernel" in k for k in out["sharded"]), out["sharded"]
    assert out["bytes"][1] < out["bytes"][0] / 2
