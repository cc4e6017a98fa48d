"""Fine-tuning: layer-wise LR decay, init_from a pretraining run, mixup / cutmix, drop path."""

from __future__ import annotations

import functools
import json
import struct
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from selfsup import backbones, cli, evaluators, objectives, optim
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.evaluators import features
from selfsup.io import checkpoint
from selfsup.objectives import supervised
from selfsup.train import finetune, loop

VIT = {"name": "vit", "variant": "Ti/8", "depth": 3, "width": 32, "num_heads": 2}


def smoke(name: str, **overrides) -> config_lib.mlc.ConfigDict:
    return config_lib.resolve(
        config_lib.load(str(REPO / "configs" / f"{name}:smoke")),
        {k: str(v) for k, v in overrides.items()},
    )


def flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def supervised_params(backbone: dict, size=16):
    """(params of the supervised objective around `backbone`, all ones; its backbone module)."""
    model = objectives.build({"name": "supervised"}, backbone, num_classes=5)
    images = jnp.zeros((2, size, size, 3))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), (images,), train=False, labels=jnp.zeros(2, int))
    )
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes["params"]), model.backbone


def vit_params(depth=3):
    return supervised_params({**VIT, "depth": depth})


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay.


def mae_layer_id(path: str, depth: int) -> int:
    """MAE's lr_decay.py rule, written from its description: patch embedding and tokens 0, block
    i is i + 1, everything else (final norm, head) depth + 1."""
    name = path.removeprefix("backbone/")
    if name.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token")):
        return 0
    if name.startswith("blocks_"):
        return int(name.split("/")[0].split("_")[1]) + 1
    return depth + 1


def test_each_parameters_lr_multiplier_is_decay_to_the_num_layers_minus_its_layer_id():
    depth, decay = 3, 0.65
    params, backbone = vit_params(depth)
    mults = flatten(finetune.layer_decay_multipliers(params, decay, backbone))
    assert len(mults) == len(flatten(params))
    for path, mult in mults.items():
        # num_layers = depth + 1: the head and final norm get 1, block i decay^(depth - i).
        expected = decay ** (depth + 1 - mae_layer_id(path, depth))
        np.testing.assert_allclose(mult, expected, rtol=1e-12, err_msg=path)
    assert mults["head/kernel"] == 1.0 and mults["backbone/norm/scale"] == 1.0
    np.testing.assert_allclose(mults["backbone/blocks_2/attn/qkv/kernel"], decay)
    np.testing.assert_allclose(mults["backbone/blocks_0/mlp/fc1/bias"], decay**3)
    np.testing.assert_allclose(mults["backbone/patch_embed/kernel"], decay**4)
    np.testing.assert_allclose(mults["backbone/cls_token"], decay**4)


def test_layer_decay_scales_every_update_by_its_multiplier():
    params, backbone = vit_params()
    lr, decay = 0.1, 0.5
    cfg = dict(
        name="sgd",
        base_lr=lr,
        lr_batch_divisor=0,
        momentum=0.0,
        weight_decay=0.0,
        schedule="constant",
        layer_decay=decay,
    )
    tx, _ = optim.build(cfg, batch_size=8, total_steps=10, backbone=backbone)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    depth = 3
    for path, update in flatten(updates).items():
        mult = decay ** (depth + 1 - mae_layer_id(path, depth))
        np.testing.assert_allclose(update, -lr * 2.0 * mult, rtol=1e-6, err_msg=path)


def test_convnet_layer_ids_are_stage_wise():
    convnext = [
        "backbone/stem_0/kernel",
        "backbone/stem_1/scale",
        "backbone/stages_0/blocks_0/conv_dw/kernel",
        "backbone/stages_2/downsample_1/kernel",
        "backbone/stages_3/blocks_1/mlp/fc2/bias",
        "backbone/head_norm/scale",
        "head/kernel",
    ]
    model = backbones.build("convnext", variant="atto")
    assert finetune.layer_ids(convnext, model) == ([0, 0, 1, 3, 4, 5, 5], 5)
    resnet = [
        "backbone/conv1/kernel",
        "backbone/bn1/scale",
        "backbone/layer1_0/conv1/kernel",
        "backbone/layer3_5/bn2/bias",
        "backbone/layer4_2/conv3/kernel",
        "head/kernel",
    ]
    model = backbones.build("resnet", variant="50")
    assert finetune.layer_ids(resnet, model) == ([0, 0, 1, 3, 4, 5], 5)


class NoLayers(nn.Module):
    """A stand-in backbone declaring no layers: [B, H, W, C] -> pooled [B, 4]."""

    mask_modes = ()
    mutable = ()
    rng_streams = ()

    @nn.compact
    def __call__(self, images, *, train=False, mask=None):
        x = nn.Dense(4, name="first")(images.reshape(images.shape[0], -1))
        return backbones.Features(pooled=nn.Dense(4, name="second")(x))


class TwoLayers(NoLayers):
    """The stand-in declaring its layers for layer-wise decay: `first` is layer 1, `second`
    layer 2, of 3."""

    num_layers = 3

    def layer_id(self, path: str) -> int:
        return {"first": 1, "second": 2}[path.split("/")[0]]


def register_backbone(monkeypatch, name: str, model: type) -> None:
    """Make `model` the backbone `name` (`selfsup.backbones.<name>.Model`) for this test."""
    module = types.ModuleType(f"selfsup.backbones.{name}")
    module.Model = model
    monkeypatch.setattr(model, "__module__", module.__name__)
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_layer_decay_uses_the_layers_a_backbone_declares(monkeypatch):
    register_backbone(monkeypatch, "twolayers", TwoLayers)
    params, backbone = supervised_params({"name": "twolayers"}, size=4)
    assert isinstance(backbone, TwoLayers)
    lr, decay = 0.1, 0.5
    cfg = dict(name="sgd", base_lr=lr, lr_batch_divisor=0, momentum=0.0, weight_decay=0.0)
    tx, _ = optim.build(
        {**cfg, "schedule": "constant", "layer_decay": decay},
        batch_size=8,
        total_steps=10,
        backbone=backbone,
    )
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    layer = {"backbone/first": 1, "backbone/second": 2, "head": 3}  # the head: num_layers
    updates = flatten(updates)
    assert {k.rsplit("/", 1)[0] for k in updates} == set(layer)
    for path, update in updates.items():
        np.testing.assert_allclose(update, -lr * decay ** (3 - layer[path.rsplit("/", 1)[0]]))


def test_layer_decay_errors(monkeypatch):
    with pytest.raises(UserError, match="layer_decay must be in"):
        optim.build(
            dict(base_lr=1e-3, lr_batch_divisor=0, layer_decay=1.5), batch_size=8, total_steps=10
        )
    register_backbone(monkeypatch, "nolayers", NoLayers)
    with pytest.raises(UserError, match="backbone 'nolayers' declares no layers"):
        optim.build(
            dict(base_lr=1e-3, lr_batch_divisor=0, layer_decay=0.75),
            batch_size=8,
            total_steps=10,
            backbone=backbones.build("nolayers"),
        )


# ---------------------------------------------------------------------------------------------
# init_from.


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A smoke MAE pretraining run (the backbone of finetune_vit_in1k.py:smoke)."""
    workdir = tmp_path_factory.mktemp("mae")
    loop.train_and_evaluate(smoke("mae_vit_in1k.py", total_steps=2), str(workdir))
    return workdir


@pytest.mark.slow  # end to end through the loop
def test_finetune_starts_from_the_pretrained_backbone_with_a_new_head(pretrained, tmp_path):
    # Step 0's LR is 0 (1 warmup step), so the checkpoint of step 1 holds the initial parameters.
    config = smoke("finetune_vit_in1k.py", init_from=pretrained, total_steps=1)
    loop.train_and_evaluate(config, str(tmp_path))
    mae, _ = checkpoint.restore_params(pretrained)
    tuned, _ = checkpoint.restore_params(tmp_path)
    mae_backbone, tuned_backbone = flatten(mae["backbone"]), flatten(tuned["backbone"])
    assert mae_backbone.keys() == tuned_backbone.keys()
    for key, value in mae_backbone.items():
        np.testing.assert_array_equal(tuned_backbone[key], value, err_msg=key)
    assert set(tuned) == {"backbone", "head"}  # the decoder stayed behind
    assert tuned["head"]["kernel"].shape == (64, 10)
    assert "head" not in mae


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backbone.depth": 3}, r"has no backbone params/blocks_2/\S+, which config.backbone"),
        ({"backbone.depth": 1}, r"has backbone params/blocks_1/\S+, which config.backbone does"),
        (
            {"backbone.width": 32},
            r"backbone params/blocks_0/\S+ has shape \(.*64.*\) there but \(.*32.*\) in config",
        ),
    ],
)
def test_init_from_a_different_backbone_is_a_one_line_error(
    pretrained, tmp_path, overrides, message
):
    config = smoke("finetune_vit_in1k.py", init_from=pretrained, **overrides)
    with pytest.raises(UserError, match=message) as info:
        loop.train_and_evaluate(config, str(tmp_path))
    assert "\n" not in str(info.value) and "set config.backbone to match" in str(info.value)


def test_init_from_a_missing_workdir_is_an_error(tmp_path):
    config = smoke("finetune_vit_in1k.py", init_from=tmp_path / "nowhere")
    with pytest.raises(UserError, match="is not a directory"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow  # end to end through the loop
def test_a_resumed_finetune_continues_its_own_run(pretrained, tmp_path):
    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        # Training records only (the evaluation at each run's end writes its own).
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}

    common = {"optim.schedule": "constant", "init_from": pretrained}  # LR independent of length
    loop.train_and_evaluate(
        smoke("finetune_vit_in1k.py", total_steps=3, **common), str(tmp_path / "full")
    )
    loop.train_and_evaluate(
        smoke("finetune_vit_in1k.py", total_steps=2, **common), str(tmp_path / "split")
    )
    # A second init_from would fail (no such directory): the resumed run must not read it.
    resumed = {**common, "init_from": tmp_path / "nowhere"}
    loop.train_and_evaluate(
        smoke("finetune_vit_in1k.py", total_steps=3, **resumed), str(tmp_path / "split")
    )
    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    a, _ = checkpoint.restore_params(tmp_path / "full")
    b, _ = checkpoint.restore_params(tmp_path / "split")
    for key, value in flatten(a).items():
        np.testing.assert_array_equal(flatten(b)[key], value, err_msg=key)


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix against NumPy float64 (timm's Mixup, mode "batch").


def reference_targets(labels, num_classes, smoothing):
    off = smoothing / num_classes
    targets = np.full((len(labels), num_classes), off)
    targets[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    return targets


def reference_cutmix(images, targets, lam, center):
    """CutMix (Yun et al. 2019) as timm's rand_bbox + correct_lam: a box of sides
    int(size * sqrt(1 - lam)) around `center`, clipped; lam becomes the kept fraction."""
    h, w = images.shape[1:3]
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = center
    yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
    xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
    out = images.copy()
    out[:, yl:yh, xl:xh] = images[::-1][:, yl:yh, xl:xh]
    kept = 1.0 - (yh - yl) * (xh - xl) / (h * w)
    return out, kept * targets + (1.0 - kept) * targets[::-1]


@pytest.mark.parametrize(
    "lam, center", [(0.3, (2, 5)), (0.75, (0, 0)), (0.05, (7, 3)), (0.999, (4, 4)), (0.5, (6, 1))]
)
def test_cutmix_matches_numpy(lam, center):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 6, 3))
    labels = rng.integers(0, 5, 4)
    targets = reference_targets(labels, 5, 0.1)
    want_x, want_t = reference_cutmix(images, targets, lam, center)
    got_x, got_t = supervised.mix(
        jnp.asarray(images, jnp.float32),
        jnp.asarray(targets, jnp.float32),
        jnp.float32(lam),
        jnp.bool_(True),
        jnp.asarray(center),
    )
    np.testing.assert_allclose(got_x, want_x, rtol=1e-6)
    np.testing.assert_allclose(got_t, want_t, rtol=1e-6)


def test_mixup_matches_numpy():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(6, 4, 4, 3))
    labels = rng.integers(0, 7, 6)
    targets = reference_targets(labels, 7, 0.1)
    lam = 0.3
    got_x, got_t = supervised.mix(
        jnp.asarray(images, jnp.float32),
        jnp.asarray(targets, jnp.float32),
        jnp.float32(lam),
        jnp.bool_(False),
        jnp.asarray((1, 1)),
    )
    np.testing.assert_allclose(got_x, lam * images + (1 - lam) * images[::-1], rtol=1e-5)
    np.testing.assert_allclose(got_t, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)
    np.testing.assert_allclose(
        supervised.smooth_targets(jnp.asarray(labels), 7, 0.1), targets, rtol=1e-6
    )


def test_mix_draws_follow_timms_distribution():
    keys = jax.random.split(jax.random.key(0), 4000)

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def draw(keys, mixup_alpha, cutmix_alpha, prob):
        return jax.vmap(
            lambda k: supervised.sample_mix(
                k, (8, 6), mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob
            )
        )(keys)

    lam, use_cutmix, center = (np.asarray(a) for a in draw(keys, 0.8, 1.0, 1.0))
    assert abs(use_cutmix.mean() - 0.5) < 0.04  # switch_prob 0.5
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    for mask, a in ((use_cutmix, 1.0), (~use_cutmix, 0.8)):
        assert abs(lam[mask].mean() - 0.5) < 0.03
        assert abs(lam[mask].var() - 1 / (4 * (2 * a + 1))) < 0.01
    assert set(np.unique(center[:, 0])) == set(range(8))
    assert set(np.unique(center[:, 1])) == set(range(6))
    lam, use_cutmix, _ = (np.asarray(a) for a in draw(keys[:50], 0.0, 1.0, 0.5))
    assert use_cutmix.all() and 10 < (lam == 1.0).sum() < 40  # unmixed with prob 1 - 0.5
    _, use_cutmix, _ = draw(keys[:50], 0.8, 0.0, 1.0)
    assert not np.asarray(use_cutmix).any()


def test_mixing_and_drop_path_follow_their_rng_streams():
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    labels = jnp.arange(4)

    def losses(model, stream):
        variables = model.init(jax.random.key(0), (images,), train=False, labels=labels)
        apply = jax.jit(
            lambda key: model.apply(
                variables, (images,), train=True, labels=labels, rngs={stream: key}
            )[0]
        )
        return [float(apply(jax.random.key(seed))) for seed in (0, 0, 1, 2, 3)]

    mixing = objectives.build(
        {"name": "supervised", "mixup_alpha": 0.8, "cutmix_alpha": 1.0}, VIT, num_classes=5
    )
    got = losses(mixing, "mixup")
    assert got[0] == got[1] and len(set(got[1:])) == 4
    dropping = objectives.build({"name": "supervised"}, {**VIT, "drop_path": 0.5}, num_classes=5)
    got = losses(dropping, "drop_path")
    assert got[0] == got[1] and len(set(got[1:])) > 1
    with pytest.raises(UserError, match="even batch"):
        mixing.init_with_output(
            {"params": jax.random.key(0), "mixup": jax.random.key(0)},
            (images[:3],),
            train=True,
            labels=labels[:3],
        )


def tensorboard_tags(folder: Path) -> set[str]:
    """Scalar tags in the TensorBoard event files under `folder` (TFRecord framing: length u64,
    its crc u32, an Event proto, its crc u32)."""
    from tensorboardX.proto.event_pb2 import Event

    tags = set()
    for path in folder.rglob("events.out.tfevents*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            tags |= {value.tag for value in event.summary.value}
            offset += 16 + length
    return tags


@pytest.mark.slow  # end to end through the loop
def test_finetune_reports_its_classifiers_test_top1(pretrained, tmp_path, capsys):
    """`selfsup train` of the fine-tuning config: the head's test top-1 at the end (and every N
    steps when asked) in metrics.jsonl, TensorBoard and the last line, equal to the saved
    network's accuracy on those images."""
    argv = ["train", "--config", str(REPO / "configs" / "finetune_vit_in1k.py:smoke")]
    argv += ["--workdir", str(tmp_path), f"--config.init_from={pretrained}"]
    assert cli.main([*argv, "--config.total_steps=4", "--config.evaluators.every_steps=2"]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/classifier/top1" in r}
    assert sorted(evals) == [2, 4]
    top1 = evals[4]["eval/classifier/top1"]
    assert last.startswith("selfsup: done") and f"classifier top-1 {100 * top1:.1f}%" in last
    assert "eval/classifier/top1" in tensorboard_tags(tmp_path / "tensorboard")

    # The same number from the checkpoint: its backbone and head on the 64 test images.
    params, meta = checkpoint.restore_params(tmp_path)
    config = dict(meta["config"]["backbone"])
    model = backbones.build(config.pop("name"), **config)
    eval_config = evaluators.inherit(
        evaluators.resolve({"name": "classifier", "test_limit": 64}), meta["config"]
    )
    source = features.load_split(eval_config.data, "test", 64, 0)
    images = np.stack([source[i][0] for i in range(len(source))])
    labels = np.asarray([source[i][1] for i in range(len(source))])
    (x,) = features.view_fn(eval_config.view)(jnp.asarray(images), jax.random.key(0))
    pooled = model.apply({"params": params["backbone"]}, x, train=False).pooled
    logits = np.asarray(pooled, np.float64) @ params["head"]["kernel"] + params["head"]["bias"]
    assert top1 == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1 / 64)
