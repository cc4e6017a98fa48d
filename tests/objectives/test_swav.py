"""SwAV: Sinkhorn and the swapped-prediction loss against NumPy float64 references written from
the paper, the objective (head, prototypes, queue) against NumPy, optim's `frozen_until` against
NumPy SGD, 8 emulated devices against one with the queue in use, and the smoke config's queue and
frozen prototypes through a checkpoint and resume."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO

from selfsup import config as config_lib
from selfsup import objectives, optim
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.objectives import swav
from selfsup.train import loop

VIT = {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2}

# ---------------------------------------------------------------- NumPy float64 references


def ref_sinkhorn(scores, epsilon, iterations):
    """The paper's Eq. 3 solved by Sinkhorn-Knopp (its Algorithm 1): Q = exp(C^T Z / eps) [K, B],
    alternately rescaled to row sums 1/K (prototypes) and column sums 1/B (samples)."""
    q = np.exp(np.asarray(scores, np.float64).T / epsilon)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def ref_loss(scores, codes, assign, temperature):
    """The paper's Eq. 1 summed over swapped pairs, averaged as the official code."""
    scores = np.asarray(scores, np.float64)
    v = len(scores)
    total = 0.0
    for a, crop in enumerate(assign):
        sub = 0.0
        for other in range(v):
            if other == crop:
                continue
            x = scores[other] / temperature
            logp = x - x.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            sub += -(codes[a] * logp).sum(1).mean()
        total += sub / (v - 1)
    return total / len(assign)


def unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- Sinkhorn and the loss


@pytest.mark.parametrize("n, k, eps, iters", [(16, 5, 0.05, 3), (7, 12, 0.1, 1), (32, 8, 0.05, 10)])
def test_sinkhorn_matches_the_paper(n, k, eps, iters):
    rng = np.random.default_rng(n)
    scores = unit(rng, (n, 6)) @ unit(rng, (k, 6)).T  # cosine scores, as in SwAV
    got = swav.sinkhorn(jnp.asarray(scores, jnp.float32), eps, iters)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_sinkhorn(scores, eps, iters), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-5)  # rows sum to 1


def test_sinkhorn_columns_converge_to_equal_partition_and_no_gradient():
    rng = np.random.default_rng(0)
    scores = jnp.asarray(unit(rng, (24, 4)) @ unit(rng, (6, 4)).T, jnp.float32)
    q = np.asarray(swav.sinkhorn(scores, 0.3, 300))
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(q.sum(0), 24 / 6, rtol=1e-3)  # columns: B / K
    g = jax.grad(lambda s: (swav.sinkhorn(s) * jnp.arange(6.0)).sum())(scores)
    assert not np.any(np.asarray(g))


def test_sinkhorn_is_float32_for_bf16_scores():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(unit(rng, (16, 4)) @ unit(rng, (8, 4)).T, jnp.bfloat16)
    got = swav.sinkhorn(scores, 0.05, 3)
    assert got.dtype == jnp.float32
    # The reference from the same bf16-rounded scores in float64: a bf16 exp/sum would be off
    # by ~1e-2 relative.
    want = ref_sinkhorn(np.asarray(scores.astype(jnp.float32)), 0.05, 3)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-5)


def test_swapped_prediction_loss_matches_numpy():
    rng = np.random.default_rng(2)
    scores = rng.uniform(-1, 1, size=(5, 6, 7))
    codes = np.stack([ref_sinkhorn(scores[i], 0.05, 3) for i in (0, 1)])
    got = swav.swapped_prediction_loss(
        jnp.asarray(scores, jnp.float32), jnp.asarray(codes, jnp.float32), (0, 1), 0.1
    )
    np.testing.assert_allclose(float(got), ref_loss(scores, codes, (0, 1), 0.1), rtol=1e-5)


# ---------------------------------------------------------------- the objective


def ref_head(pooled, p):
    """Linear, training-mode BN over all crops, ReLU, Linear, L2 normalisation (float64)."""
    x = np.asarray(pooled, np.float64) @ p["linear_0"]["kernel"] + p["linear_0"]["bias"]
    x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * p["bn_0"]["scale"] + p["bn_0"]["bias"]
    x = np.maximum(x, 0) @ p["linear_1"]["kernel"] + p["linear_1"]["bias"]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def setup_model(**kw):
    objective = {
        "name": "swav",
        "num_views": 4,
        "num_prototypes": 10,
        "proj_hidden": 24,
        "proj_dim": 8,
        **kw,
    }
    model = objectives.build(objective, VIT)
    rng = np.random.default_rng(3)
    views = tuple(jnp.asarray(rng.uniform(size=(6, s, s, 3)), jnp.float32) for s in (16, 16, 8, 8))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), views)
    encode = jax.jit(lambda v, im: model.apply(v, im, method=lambda m, x: m.backbone(x).pooled))
    pooled = [encode(variables, v) for v in views]
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])
    z = ref_head(np.concatenate(pooled), p["head"]).reshape(4, 6, -1)  # [V, B, d]
    w = p["prototypes"] / np.linalg.norm(p["prototypes"], axis=0)
    return model, views, variables, z, w


def test_objective_matches_numpy_with_normalised_prototypes():
    model, views, variables, z, w = setup_model()
    # Stored prototypes are not unit vectors: the forward pass normalises them.
    assert not np.allclose(np.linalg.norm(variables["params"]["prototypes"], axis=0), 1.0)
    step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    (loss, metrics), _ = step(variables, views)
    scores = z @ w
    codes = np.stack([ref_sinkhorn(scores[i], 0.05, 3) for i in (0, 1)])
    np.testing.assert_allclose(float(loss), ref_loss(scores, codes, (0, 1), 0.1), rtol=1e-4)
    assert float(metrics["queue_used"]) == 0.0


def test_queue_fills_from_its_start_step_and_is_used_once_full():
    model, views, variables, z, w = setup_model(queue_length=12, queue_start_step=1)
    state = {k: v for k, v in variables.items() if k != "params"}
    assert state["queue"]["embeddings"].shape == (2, 12, 8) and int(state["queue"]["steps"]) == 0
    history = []
    step = jax.jit(functools.partial(model.apply, train=True, mutable=True))
    for _ in range(4):
        (loss, metrics), upd = step({"params": variables["params"], **state}, views)
        history.append((float(loss), float(metrics["queue_used"]), state))
        state = {**state, **upd}
    queues = [np.asarray(h[2]["queue"]["embeddings"]) for h in history] + [
        np.asarray(state["queue"]["embeddings"])
    ]
    assert not queues[1].any()  # step 0 is before queue_start_step: nothing pushed
    np.testing.assert_allclose(queues[2][:, :6], z[:2], atol=1e-5)  # newest at the front
    np.testing.assert_allclose(queues[3][:, 6:], z[:2], atol=1e-5)  # rolled back by B
    assert [h[1] for h in history] == [0.0, 0.0, 0.0, 1.0]  # full after 2 pushes of 6
    # Step 3: Sinkhorn over [queue; batch] with the current prototypes, codes of the batch rows.
    scores = z @ w
    codes = np.stack(
        [ref_sinkhorn(np.concatenate([queues[3][a] @ w, scores[a]]), 0.05, 3)[-6:] for a in (0, 1)]
    )
    np.testing.assert_allclose(history[3][0], ref_loss(scores, codes, (0, 1), 0.1), rtol=1e-4)
    # Differently ordered random queue content changes the codes: the queue really is read.
    noisy = {
        **state,
        "queue": {
            **state["queue"],
            "embeddings": jnp.asarray(unit(np.random.default_rng(9), (2, 12, 8)), jnp.float32),
        },
    }
    (loss_noisy, _), _ = step({"params": variables["params"], **noisy}, views)
    assert abs(float(loss_noisy) - history[3][0]) > 1e-4


def test_bad_settings_are_user_errors():
    for kw, match in [
        ({"crops_for_assign": (0, 9)}, "crops_for_assign"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"queue_length": -1}, "queue_length"),
    ]:
        with pytest.raises(UserError, match=match):
            objectives.build({"name": "swav", **kw}, VIT)
    model = objectives.build({"name": "swav", "num_views": 3}, VIT)
    with pytest.raises(UserError, match="num_views"):
        model.init(jax.random.key(0), (jnp.zeros((2, 8, 8, 3)),) * 2, train=False)


# ---------------------------------------------------------------- optim: frozen_until


def test_frozen_until_holds_parameters_and_their_optimizer_state():
    cfg = dict(
        name="sgd",
        base_lr=0.1,
        lr_batch_divisor=0,
        warmup_steps=0,
        schedule="constant",
        momentum=0.9,
        weight_decay=0.01,
        no_decay=(),
        frozen_until=(("protos", 2),),
        grad_clip_norm=1.0,
    )
    tx, _ = optim.build(cfg, batch_size=1, total_steps=10)
    rng = np.random.default_rng(4)
    params = {"protos": rng.normal(size=(3, 2)), "w": rng.normal(size=(4,))}
    grads = [{k: 3 * rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(tree)
    for g in grads:
        upd, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, tree)
        tree = optax.apply_updates(tree, upd)
    # NumPy: torch SGD (L2 decay, momentum) where held parameters have .grad None for 2 steps and
    # are outside the clipping norm.
    p = {k: v.copy() for k, v in params.items()}
    buf = {}
    for step, g in enumerate(grads):
        live = [k for k in p if k != "protos" or step >= 2]
        norm = np.sqrt(sum((g[k] ** 2).sum() for k in live))
        for k in live:
            d = g[k] * min(1.0, 1.0 / norm) + 0.01 * p[k]
            buf[k] = d if k not in buf else 0.9 * buf[k] + d
            p[k] = p[k] - 0.1 * buf[k]
    for k in p:
        np.testing.assert_allclose(tree[k], p[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(tree["protos"], params["protos"])
    with pytest.raises(UserError, match="frozen_until"):
        optim.build({**cfg, "frozen_until": (("protos", -1),)}, batch_size=1, total_steps=10)
    with pytest.raises(UserError, match="frozen_until"):
        bad, _ = optim.build(
            {**cfg, "frozen_until": (("protoz", 1),)}, batch_size=1, total_steps=10
        )
        bad.init(jax.tree.map(jnp.asarray, params))


# ---------------------------------------------------------------- 8 devices = 1 device

EIGHT_DEVICES = r"""
import json, jax, numpy as np, jax.numpy as jnp, optax
from selfsup import augment, objectives
from selfsup.parallel import sharding
from selfsup import pytree
from selfsup.train import state as state_lib
from selfsup.train import step as step_lib

model = objectives.build(OBJECTIVE, BACKBONE)
views_fn = augment.build(VIEWS)
images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
example = tuple(jnp.zeros(v.shape, v.dtype) for v in jax.eval_shape(
    views_fn, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8), jax.random.key(0)))
one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
state, _ = state_lib.create(model, optax.sgd(0.1), example, 0, one, ())
host = jax.tree.map(np.asarray, state)
# A full queue of random unit embeddings: the queue path of Sinkhorn is the one compared.
q = np.random.default_rng(1).normal(size=host.model_state["queue"]["embeddings"].shape)
q = (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(np.float32)
host = host.replace(model_state={**host.model_state,
                                 "queue": {"embeddings": q, "steps": np.int32(5)}})
out = {}
for name, mesh in [("one", one), ("eight", sharding.make_mesh({"data": 4, "fsdp": 2}))]:
    placed = jax.device_put(host, sharding.tree_shardings(host, mesh, [(".*", "fsdp")]))
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
    loss, metrics, grads, updates = jax.jit(step_lib.make_grad_fn(model, views_fn, seed=0))(
        placed, batch)
    flat = lambda t: {pytree.path_str(p): np.asarray(v)
                      for p, v in jax.tree_util.tree_leaves_with_path(t)}
    out[name] = (float(loss), flat(grads), flat(updates), float(metrics["queue_used"]))
(l1, g1, u1, q1), (l8, g8, u8, q8) = out["one"], out["eight"]
def rel(a, b):
    floor = 1e-3 * max(float(np.abs(v).max()) for v in a.values())
    return max(float(np.abs(a[k] - b[k]).astype(float).max()) /
               max(float(np.abs(a[k]).max()), floor) for k in a)
print(json.dumps({"loss": [l1, l8], "grad_err": rel(g1, g8), "state_err": rel(u1, u8),
                  "queue_used": [q1, q8], "proto_grad": float(np.abs(g1["prototypes"]).max()),
                  "state_keys": sorted(u1)}))
"""

_VIEWS = list(config_lib.load(str(REPO / "configs/swav_resnet_in1k.py:smoke")).views)
_OBJECTIVE = {
    "name": "swav",
    "num_views": 4,
    "num_prototypes": 12,
    "proj_hidden": 32,
    "proj_dim": 8,
    "queue_length": 16,
}
EIGHT_DEVICE_CHECKS = {
    "swav": f"OBJECTIVE, BACKBONE, VIEWS = {_OBJECTIVE!r}, {VIT!r}, {_VIEWS!r}\n" + EIGHT_DEVICES
}


def test_eight_devices_give_the_loss_gradients_and_queue_of_one(eight_devices):
    out = json.loads(eight_devices("swav"))
    one, eight = out["loss"]
    assert np.isfinite(one) and out["queue_used"] == [1.0, 1.0] and out["proto_grad"] > 0
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert out["grad_err"] < 1e-4, out
    assert out["state_err"] < 1e-4, out
    assert "queue/embeddings" in out["state_keys"] and "queue/steps" in out["state_keys"], out


# ---------------------------------------------------------------- smoke config through the loop


@pytest.mark.slow  # end to end through the loop
def test_prototypes_stay_frozen_for_the_configured_steps_and_the_queue_fills(tmp_path):
    """The smoke run (prototypes frozen for 2 steps, queue from step 1) through the loop;
    test_train.py checks that its queue and parameters resume bit-exactly."""
    config = config_lib.load(str(REPO / "configs/swav_resnet_in1k.py:smoke"))
    out = loop.train_and_evaluate(
        config_lib.resolve(config, {"checkpoint_every_steps": "1"}), str(tmp_path)
    )
    # The queue (16 = one batch) starts at step 1 and is full, hence used, from step 2 on.
    assert out["queue_used"] == 1.0
    trees = {
        s: checkpoint.restore_tree(tmp_path, ("params", "model_state"), step=s)[0]
        for s in (1, 2, 3)
    }
    queue = trees[3]["model_state"]["queue"]
    assert int(queue["steps"]) == 3 and queue["embeddings"].any()
    params = {s: tree["params"] for s, tree in trees.items()}
    np.testing.assert_array_equal(params[1]["prototypes"], params[2]["prototypes"])
    assert not np.array_equal(params[2]["prototypes"], params[3]["prototypes"])
    assert not np.array_equal(
        params[1]["backbone"]["conv1"]["kernel"], params[2]["backbone"]["conv1"]["kernel"]
    )
