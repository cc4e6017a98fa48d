"""SimCLRv2 and its distillation stage: NT-Xent, the projection head and the distillation loss
against NumPy float64 references written from the papers; 8 emulated devices against one; the
smoke configs end to end with resume; the frozen teacher."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, numeric_grad

from selfsup import augment, objectives, optim
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.objectives import distill, simclr
from selfsup.train import loop
from selfsup.train import step as step_lib
from selfsup.train import teacher as teacher_lib

VIT = {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2}

# ---------------------------------------------------------------- NumPy float64 references


def ref_nt_xent(z1, z2, t):
    """SimCLR Eq. 1 with the paper's layout: views 2k and 2k+1 are the pair of image k;
    l(i, j) = -log exp(sim_ij / t) / sum_{k != i} exp(sim_ik / t); L = mean over the 2N."""
    z = np.empty((2 * len(z1), z1.shape[1]))
    z[0::2], z[1::2] = z1, z2
    z = z.astype(np.float64)
    m = len(z)
    sim = np.array([[z[i] @ z[k] / np.linalg.norm(z[i]) / np.linalg.norm(z[k]) for k in range(m)]
                    for i in range(m)])  # fmt: skip
    total = 0.0
    for i in range(m):
        j = i + 1 if i % 2 == 0 else i - 1
        denom = sum(np.exp(sim[i, k] / t) for k in range(m) if k != i)
        total += -np.log(np.exp(sim[i, j] / t) / denom)
    return total / m


def ref_bn_train(x, scale, bias, eps=1e-5):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean(0)  # biased, as BatchNorm normalises in training
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_head(x, params):
    """SimCLRv2 head: Dense(no bias) -> BN (-> ReLU) per layer; last BN without centre."""
    x = x.astype(np.float64)
    layers = sorted(params, key=lambda k: int(k.split("_")[1]))
    for i, name in enumerate(layers):
        p = params[name]
        x = x @ np.asarray(p["dense"]["kernel"], np.float64)
        bias = np.asarray(p["bn"]["bias"], np.float64) if "bias" in p["bn"] else 0.0
        x = ref_bn_train(x, np.asarray(p["bn"]["scale"], np.float64), bias)
        if i < len(layers) - 1:
            x = np.maximum(x, 0.0)
    return x


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("n, d, t", [(4, 8, 0.1), (7, 5, 0.5), (1, 3, 1.0)])
def test_nt_xent_matches_the_paper(n, d, t):
    rng = np.random.default_rng(n)
    z1, z2 = rng.normal(size=(2, n, d)).astype(np.float32) * rng.uniform(0.1, 3.0, (2, n, 1))
    got = simclr.nt_xent(jnp.asarray(z1), jnp.asarray(z2), t)
    np.testing.assert_allclose(float(got), ref_nt_xent(z1, z2, t), rtol=2e-5)


def test_nt_xent_gradient_matches_the_reference():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 3, 4))
    g1, g2 = jax.grad(simclr.nt_xent, argnums=(0, 1))(
        jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.2
    )
    np.testing.assert_allclose(g1, numeric_grad(lambda z: ref_nt_xent(z, z2, 0.2), z1), atol=2e-4)
    np.testing.assert_allclose(g2, numeric_grad(lambda z: ref_nt_xent(z1, z, 0.2), z2), atol=2e-4)


def test_nt_xent_uses_every_other_view_as_a_negative():
    """Moving one image's views changes every anchor's loss (2N - 2 negatives, not N - 1)."""
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 6, 4)).astype(np.float32)
    logits = simclr.nt_xent_logits(jnp.asarray(z1), jnp.asarray(z2), 0.1)
    assert np.isneginf(np.diag(logits)).all()
    assert np.isfinite(logits[~np.eye(12, dtype=bool)]).all()  # 2N - 1 candidates per anchor
    moved = z1.copy()
    moved[5] = rng.normal(size=4)
    before = simclr.nt_xent(jnp.asarray(z1[:5]), jnp.asarray(z2[:5]), 0.1)
    after = simclr.nt_xent(jnp.asarray(moved), jnp.asarray(z2), 0.1)
    assert float(after) != pytest.approx(float(before))


# ---------------------------------------------------------------- the objective


def build(**objective):
    return objectives.build({"name": "simclr", **objective}, VIT)


def test_head_matches_numpy_and_exposes_its_first_layer():
    model = build(proj_dim=16)
    rng = np.random.default_rng(3)
    x1, x2 = (jnp.asarray(v) for v in rng.uniform(size=(2, 6, 16, 16, 3)).astype(np.float32))
    variables = jax.jit(lambda: model.init(jax.random.key(0), (x1, x2), train=False))()
    head = variables["params"]["head"]
    # Hidden width = the backbone's pooled dim (32); the last BN has no centre.
    assert head["layer_0"]["dense"]["kernel"].shape == (32, 32)
    assert head["layer_2"]["dense"]["kernel"].shape == (32, 16)
    assert "bias" not in head["layer_2"]["bn"] and "bias" in head["layer_1"]["bn"]
    assert not any("bias" in layer["dense"] for layer in head.values())
    assert np.std(np.asarray(head["layer_0"]["dense"]["kernel"])) == pytest.approx(0.01, rel=0.3)

    embed = jax.jit(lambda v: model.apply(v, (x1, x2), True, method="embed", mutable=True)[0])
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    z = embed(variables)
    pooled = encode(variables, jnp.stack([x1, x2], 1).reshape(12, 16, 16, 3)).pooled
    # Global BN over both views (2N rows); the interleaving is undone.
    ref = ref_head(np.asarray(pooled), head).reshape(6, 2, 16)
    np.testing.assert_allclose(z[0], ref[:, 0], atol=2e-4)
    np.testing.assert_allclose(z[1], ref[:, 1], atol=2e-4)

    feats = encode(variables, x1)
    first = feats.intermediates[simclr.FINETUNE_FEATURE]
    layer, sub = simclr.FINETUNE_LAYER.split("/")
    p = variables["params"][layer][sub]
    # Inference mode: running statistics at their initial mean 0, variance 1.
    expect = np.maximum(
        np.asarray(feats.pooled, np.float64) @ np.asarray(p["dense"]["kernel"]) / np.sqrt(1 + 1e-5)
        * np.asarray(p["bn"]["scale"]) + np.asarray(p["bn"]["bias"]),
        0.0,
    )  # fmt: skip
    np.testing.assert_allclose(first, expect, atol=1e-5)


def test_bad_settings_and_views_are_user_errors():
    with pytest.raises(UserError, match="temperature"):
        build(temperature=0.0)
    model = build()
    x = jnp.zeros((2, 16, 16, 3))
    with pytest.raises(UserError, match="same shape"):
        model.init(jax.random.key(0), (x, jnp.zeros((2, 8, 8, 3))), train=False)


# ---------------------------------------------------------------- distillation


def ref_distill(student, teacher, t):
    """The official `add_kd_loss` (simclr `colabs/distillation_self_training.ipynb`):
    tf.losses.softmax_cross_entropy(softmax(teacher / t), student / t, weights=t**2), i.e.
    t^2 times the batch mean of -sum_y P_T(y; t) log P_S(y; t)."""
    s, tch = np.asarray(student, np.float64) / t, np.asarray(teacher, np.float64) / t
    s_max = s.max(1, keepdims=True)
    log_ps = s - s_max - np.log(np.exp(s - s_max).sum(1, keepdims=True))
    pt = np.exp(tch - tch.max(1, keepdims=True))
    pt /= pt.sum(1, keepdims=True)
    return t**2 * -(pt * log_ps).sum(1).mean()


def ref_distill_grad(student, teacher, t):
    """d loss / d student logits of `ref_distill`: t (P_S - P_T) / B."""
    s, tch = np.asarray(student, np.float64) / t, np.asarray(teacher, np.float64) / t
    ps, pt = (np.exp(x - x.max(1, keepdims=True)) for x in (s, tch))
    ps, pt = ps / ps.sum(1, keepdims=True), pt / pt.sum(1, keepdims=True)
    return t * (ps - pt) / len(s)


@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_distill_loss_matches_the_official_code(t):
    rng = np.random.default_rng(4)
    s, tch = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    got = distill.distill_loss(jnp.asarray(s), jnp.asarray(tch), t)
    np.testing.assert_allclose(float(got), ref_distill(s, tch, t), rtol=1e-5)
    grad = jax.grad(distill.distill_loss)(jnp.asarray(s), jnp.asarray(tch), t)
    np.testing.assert_allclose(grad, ref_distill_grad(s, tch, t), rtol=1e-4, atol=1e-7)
    # The teacher is a constant target.
    assert not np.any(jax.grad(distill.distill_loss, argnums=1)(jnp.asarray(s), jnp.asarray(tch)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A checkpoint of a tiny (untrained) ViT classifier, as a fine-tuning run writes one."""
    return write_teacher(tmp_path_factory.mktemp("teacher"))


def write_teacher(workdir: Path) -> Path:
    """Save the tiny teacher's checkpoint in `workdir` (the eight-device check does so too)."""
    model = objectives.build({"name": "supervised", "num_classes": 5}, VIT)
    x = jnp.zeros((2, 16, 16, 3))
    init = jax.jit(
        lambda: model.init(jax.random.key(7), (x,), train=False, labels=jnp.zeros(2, int))
    )
    params = init()["params"]
    config = {"backbone": VIT, "objective": {"name": "supervised", "num_classes": 5}}
    manager = checkpoint.Manager(workdir, async_save=False)
    state = {"step": jnp.asarray(3), "params": params, "model_state": {}}
    manager.save(3, state, {"config": config})
    manager.close()
    return workdir


def test_distill_targets_are_the_teachers_predictions(teacher_dir):
    with pytest.raises(UserError, match="set config.objective.teacher"):
        teacher_lib.with_teacher({"name": "distill"})
    # The objective never reads a checkpoint: it takes the teacher the training side loaded.
    with pytest.raises(UserError, match="loaded classifier"):
        objectives.build({"name": "distill", "teacher": str(teacher_dir)}, VIT)
    objective = teacher_lib.with_teacher({"name": "distill", "teacher": str(teacher_dir)})
    model = objectives.build(objective, VIT)
    assert objectives.contract(model).needs_teacher
    teacher = model.teacher
    assert teacher.num_classes == 5 and teacher.step == 3
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.uniform(size=(4, 16, 16, 3)).astype(np.float32))
    variables = jax.jit(lambda: model.init(jax.random.key(0), (x,), train=False))()
    assert "teacher" not in variables["params"]  # outside the optimiser's reach
    stored, _ = checkpoint.restore_params(teacher_dir)
    logits = distill.teacher_logits(teacher, variables[objectives.TEACHER_COLLECTION], x)
    direct = objectives.build({"name": "supervised", "num_classes": 5}, VIT)
    feats = jax.jit(direct.backbone.apply)({"params": stored["backbone"]}, x)
    expect = (
        np.asarray(feats.pooled, np.float64) @ stored["head"]["kernel"] + stored["head"]["bias"]
    )
    np.testing.assert_allclose(logits, expect, atol=1e-5)

    def loss(params):
        out, _ = model.apply({**variables, "params": params}, (x,), train=True, mutable=True)
        return out[0]

    student = jax.jit(lambda v: model.apply(v, x, method=lambda m, im: m.backbone(im).pooled))
    head = variables["params"]["head"]
    student = np.asarray(student(variables), np.float64) @ head["kernel"] + head["bias"]
    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    np.testing.assert_allclose(value, ref_distill(student, expect, 1.0), rtol=1e-5)
    assert set(grads) == {"backbone", "head"}


# ---------------------------------------------------------------- 8 devices = 1 device

EIGHT_DEVICES = r"""
import json, jax, numpy as np, jax.numpy as jnp, optax
from selfsup import objectives
from selfsup.parallel import sharding
from selfsup import pytree
from selfsup.train import state as state_lib
from selfsup.train import step as step_lib
from selfsup.train import teacher

def compare(objective, backbone, num_views, batch=16, size=32):
    model = objectives.build(teacher.with_teacher(objective), backbone)
    # Fixed views go into the step as they are (the augmentation is not what this compares; it
    # rounds differently on another mesh, ~1e-6, which a ResNet's max-pool would amplify).
    # Blocky random images: distinct samples, so the batch statistics are well conditioned.
    cells = np.random.default_rng(0).uniform(size=(batch, num_views, 4, 4, 3))
    stacked = cells.repeat(size // 4, axis=2).repeat(size // 4, axis=3).astype(np.float32)
    views_fn = lambda x, key: tuple(x[:, i] for i in range(x.shape[1]))
    example = tuple(jnp.zeros((2, size, size, 3)) for _ in range(num_views))
    one = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    state, _ = state_lib.create(model, optax.sgd(0.1), example, 0, one, ())
    host = jax.tree.map(np.asarray, state)
    out = {}
    for name, mesh in [("one", one), ("eight", sharding.make_mesh({"data": 4, "fsdp": 2}))]:
        placed = jax.device_put(host, sharding.tree_shardings(host, mesh, [(".*", "fsdp")]))
        b = {"image": jax.device_put(stacked, sharding.batch_sharding(mesh))}
        loss, _, grads, updates = jax.jit(step_lib.make_grad_fn(model, views_fn, seed=0))(placed, b)
        flat = lambda t: {pytree.path_str(p): np.asarray(v)
                          for p, v in jax.tree_util.tree_leaves_with_path(t)}
        out[name] = (float(loss), flat(grads), flat(updates))
    (l1, g1, u1), (l8, g8, u8) = out["one"], out["eight"]
    # Each leaf relative to its largest entry, or to 1% of the largest over all leaves for
    # leaves whose gradient is zero in exact arithmetic (e.g. the backbone's last norm bias,
    # which the head's Dense-without-bias + BatchNorm cancels) and only float noise here.
    def rel(a, b):
        if not a:
            return 0.0
        floor = 1e-2 * max(float(np.abs(v).max()) for v in a.values())
        return max(float(np.abs(a[k] - b[k]).max()) / max(float(np.abs(a[k]).max()), floor)
                   for k in a)
    return {"loss": [l1, l8], "grad_err": rel(g1, g8), "state_err": rel(u1, u8),
            "leaves": len(g1), "state_leaves": len(u1)}

print(json.dumps({name: compare(*args) for name, args in CASES.items()}))
"""


def eight_device_cases(teacher: Path) -> dict:
    return {
        "simclr": ({"name": "simclr", "proj_dim": 16}, VIT, 2),
        "distill": ({"name": "distill", "teacher": str(teacher)}, VIT, 1),
    }


EIGHT_DEVICE_CHECKS = {
    "simclr_distill": "import sys\n"
    "sys.path[:0] = ['tests', 'tests/objectives']\n"
    "from test_simclr import eight_device_cases, write_teacher\n"
    "CASES = eight_device_cases(write_teacher(TMP))\n" + EIGHT_DEVICES
}


def test_eight_devices_give_the_loss_gradients_and_bn_statistics_of_one(eight_devices):
    out = json.loads(eight_devices("simclr_distill"))
    for name, result in out.items():
        one, eight = result["loss"]
        assert np.isfinite(one), name
        np.testing.assert_allclose(eight, one, rtol=1e-5, err_msg=name)
        assert result["grad_err"] < 1e-4, (name, result)
        assert result["state_err"] < 1e-4, (name, result)
    # SimCLR's BN statistics were compared; distillation's ViT student writes no state (its
    # teacher is read-only, not among the objective's mutable collections).
    assert out["simclr"]["state_leaves"] > 0 and out["distill"]["state_leaves"] == 0, out


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "arg, batch", [("variant=50x2-sk", 4096), ("variant=152x3-sk,batch=1024", 1024)]
)
def test_recipe_config_builds_with_square_root_lr_scaling(arg, batch):
    config = config_lib.resolve(config_lib.load(f"{REPO / 'configs/simclr_resnet_in1k.py'}:{arg}"))
    model = step_lib.build_model(config)
    assert model.backbone.variant == arg.split(",")[0].split("=")[1]
    assert model.backbone.zero_init_last_bn and model.temperature == 0.1
    uint8 = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.uint8)
    views = jax.eval_shape(augment.build(config.views), uint8, jax.random.key(0))
    assert [v.shape for v in views] == [(1, 224, 224, 3)] * 2
    no_warmup = {**config.optim.to_dict(), "warmup_epochs": 0.0}
    _, schedule = optim.build(no_warmup, batch_size=config.batch_size, total_steps=100)
    assert config.batch_size == batch
    np.testing.assert_allclose(float(schedule(0)), 0.075 * np.sqrt(batch), rtol=1e-6)


def test_distill_recipe_config_builds(teacher_dir):
    with pytest.raises(UserError, match="teacher"):
        step_lib.build_model(
            config_lib.resolve(config_lib.load(str(REPO / "configs/simclr_distill_resnet_in1k.py")))
        )
    spec = f"{REPO / 'configs/simclr_distill_resnet_in1k.py'}:teacher={teacher_dir}"
    model = step_lib.build_model(config_lib.resolve(config_lib.load(spec)))
    assert model.backbone.variant == "50" and model.teacher.num_classes == 5


# ---------------------------------------------------------------- smoke configs, resume


def losses(workdir) -> dict[int, float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def smoke(name: str, steps: int, arg: str = "smoke") -> config_lib.mlc.ConfigDict:
    """The smoke config for `steps` steps, with flip-only views: test_train.py runs the config as
    it is; here compiling the colour ops three times would only cost time."""
    config = config_lib.load(f"{REPO / 'configs' / name}:{arg}")
    views = tuple(spec.split("|")[1] + "|" + spec.split("|")[-1] for spec in config.views)
    overrides = {"total_steps": steps, "checkpoint_every_steps": 100, "views": views}
    return config_lib.resolve(config, {k: repr(v) for k, v in overrides.items()})


@pytest.mark.slow  # end to end through the loop
def test_distill_smoke_config_resumes_with_the_teacher_frozen(tmp_path, teacher_dir):
    # The smoke variant trains its own teacher unless given one; the fixture's is faster here.
    name, arg = "simclr_distill_resnet_in1k.py", f"smoke,teacher={teacher_dir}"
    loop.train_and_evaluate(smoke(name, 1, arg), str(tmp_path))
    out = loop.train_and_evaluate(smoke(name, 2, arg), str(tmp_path))
    assert np.isfinite(out["loss"]) and sorted(losses(tmp_path)) == [1, 2]
    stored = _flatten(checkpoint.restore_params(teacher_dir)[0])
    steps = [checkpoint.restore_tree(tmp_path, ("params", "model_state"), s)[0] for s in (1, 2)]
    for tree in steps:
        kept = _flatten(tree["model_state"][objectives.TEACHER_COLLECTION]["params"])
        assert kept.keys() == stored.keys()
        for key, value in stored.items():
            np.testing.assert_array_equal(kept[key], value, err_msg=key)
    student = [_flatten(tree["params"]) for tree in steps]
    assert any(not np.array_equal(student[0][k], student[1][k]) for k in student[0])


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out
