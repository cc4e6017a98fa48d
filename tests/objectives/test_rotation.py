"""Rotation prediction: rotate_batch against np.rot90, the loss against a NumPy float64
cross-entropy of the model's own pooled features, normalisation after rotation, 8 emulated devices
against one, and the smoke config end to end."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from selfsup import config as config_lib
from selfsup import objectives
from selfsup.errors import UserError
from selfsup.objectives import rotation

VIT = {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2}


def official_collate(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FeatureLearningRotNet's unsupervised loader: each image's 4 rotations stacked on a new
    axis 1 ([B, 4, ...]), the batch then viewed as [B * 4, ...]: image-major."""
    stacked = np.stack([np.rot90(images, k, axes=(1, 2)) for k in range(4)], axis=1)
    labels = np.tile(np.arange(4), (len(images), 1))
    return stacked.reshape(-1, *images.shape[1:]), labels.reshape(-1)


def test_rotate_batch_matches_np_rot90():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 5, 5, 2)).astype(np.float32)
    out, labels = rotation.rotate_batch(jnp.asarray(images, jnp.float32))
    want_images, want_labels = official_collate(images)
    np.testing.assert_array_equal(out, want_images)
    np.testing.assert_array_equal(labels, want_labels)
    # The docstring states the order as the official one, not as a deviation from it.
    assert "rotation-major" not in rotation.__doc__ and "image-major" in rotation.__doc__
    assert out.shape == (12, 5, 5, 2) and labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels, np.tile([0, 1, 2, 3], 3))
    for i in range(12):
        want = np.rot90(images[i // 4], k=int(labels[i]), axes=(0, 1))
        np.testing.assert_allclose(out[i], want, rtol=0, atol=0)
    # Counter-clockwise: the top-right pixel moves to the top-left under 90 degrees.
    assert float(out[1, 0, 0, 0]) == pytest.approx(images[0, 0, 4, 0])


def test_rotate_batch_rejects_non_square_images():
    with pytest.raises(UserError, match="square"):
        rotation.rotate_batch(jnp.zeros((2, 4, 6, 3)))


def test_loss_matches_numpy_and_normalises_after_rotation():
    model = objectives.build({"name": "rotation", "normalize": ((0.2, 0.4, 0.6), 0.5)}, VIT)
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), (jnp.asarray(x),)
    )
    step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (loss, metrics), _ = step(variables, (jnp.asarray(x),))
    # Reference: rotate with np.rot90, normalise, the backbone's pooled features, the head in f64.
    rotated = np.stack([np.rot90(im, k, axes=(0, 1)) for im in x for k in range(4)])
    normalised = (rotated - np.array([0.2, 0.4, 0.6])) / 0.5
    encode = jax.jit(lambda v, im: model.apply(v, im, method=lambda m, y: m.backbone(y).pooled))
    pooled = encode(variables, jnp.asarray(normalised, jnp.float32))
    head = variables["params"]["head"]
    logits = np.asarray(pooled, np.float64) @ np.asarray(head["kernel"], np.float64) + np.asarray(
        head["bias"], np.float64
    )
    labels = np.tile(np.arange(4), 4)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    want = -logp[np.arange(16), labels].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    assert float(metrics["rotation_acc"]) == pytest.approx((logits.argmax(1) == labels).mean())


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="normalize"):
        objectives.build({"name": "rotation", "normalize": "cifar"}, VIT)
    with pytest.raises(UserError, match="normalize"):
        objectives.build({"name": "rotation", "normalize": (1, 2, 3)}, VIT)


EIGHT_DEVICES = r"""
import json, jax, numpy as np, jax.numpy as jnp, optax
from selfsup import augment, objectives
from selfsup.train import loop, monitors, step as step_lib
from selfsup.parallel import sharding
from selfsup import pytree
from selfsup.train import state as state_lib

model = objectives.build(OBJECTIVE, BACKBONE)
views_fn = augment.build(VIEWS)
images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
example = tuple(jnp.zeros(v.shape, v.dtype) for v in jax.eval_shape(
    views_fn, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8), jax.random.key(0)))
one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
state, _ = state_lib.create(model, optax.sgd(0.1), example, 0, one, ())
host = jax.tree.map(np.asarray, state)
out = {}
for name, mesh in [("one", one), ("eight", sharding.make_mesh({"data": 4, "fsdp": 2}))]:
    placed = jax.device_put(host, sharding.tree_shardings(host, mesh, [(".*", "fsdp")]))
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
    loss, _, grads, updates = jax.jit(step_lib.make_grad_fn(model, views_fn, seed=0))(placed, batch)
    flat = lambda t: {pytree.path_str(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_leaves_with_path(t)}
    out[name] = (float(loss), flat(grads), flat(updates))
(l1, g1, u1), (l8, g8, u8) = out["one"], out["eight"]
def rel(a, b):
    floor = 1e-3 * max(float(np.abs(v).max()) for v in a.values())
    return max(float(np.abs(a[k] - b[k]).max()) / max(float(np.abs(a[k]).max()), floor) for k in a)
state_err = rel(u1, u8) if u1 else 0.0  # a ViT has no mutable state
print(json.dumps({"loss": [l1, l8], "grad_err": rel(g1, g8), "state_err": state_err,
                  "grad_norm": float(np.sqrt(sum((g ** 2).sum() for g in g1.values())))}))
"""

_VIEWS = list(config_lib.load(str(REPO / "configs/rotation_resnet_in1k.py:smoke")).views)
EIGHT_DEVICE_CHECKS = {
    "rotation": f"OBJECTIVE, BACKBONE, VIEWS = {{'name': 'rotation'}}, {VIT!r}, {_VIEWS!r}\n"
    + EIGHT_DEVICES
}


def test_eight_devices_give_the_loss_and_gradients_of_one(eight_devices):
    out = json.loads(eight_devices("rotation"))
    one, eight = out["loss"]
    assert np.isfinite(one) and out["grad_norm"] > 0
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert out["grad_err"] < 1e-4 and out["state_err"] < 1e-4, out
