"""ResNet backbone: variants and parameter counts (torchvision, timm, SimCLR papers), the
selective-kernel unit and ResNet-D pool against NumPy float64, SparK sparse masking, global
BatchNorm over 8 devices (the export: tests/export/test_export_resnet.py)."""

from __future__ import annotations

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, rel_err
from resnet_params import abstract_variables, count, images, randomize

from selfsup.backbones import Mask, resnet
from selfsup.errors import UserError

EPS = 1e-5


# ---------------------------------------------------------------- helpers


def leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


# ---------------------------------------------------------------- variants and counts


def test_parse_variant():
    assert resnet.parse_variant("50") == (50, 1, False)
    assert resnet.parse_variant("50x2") == (50, 2, False)
    assert resnet.parse_variant("152x3-sk") == (152, 3, True)
    assert resnet.parse_variant("18-sk") == (18, 1, True)
    assert resnet.parse_variant("200") == (200, 1, False)
    for bad in ("49", "50x0", "50x5", "50-SK", "x2", "50x", "resnet50", "50-sk-x2", ""):
        with pytest.raises(UserError, match=r"<depth>\[x<width>\]\[-sk\]"):
            resnet.Model(variant=bad)
    with pytest.raises(UserError, match="bn_momentum"):
        resnet.Model(variant="18", bn_momentum=1.0)
    assert resnet.Model(variant="18").mask_modes == ("sparse",)
    assert resnet.Model(variant="50x2-sk").embed_dim == 4096
    assert resnet.Model(variant="34x3").embed_dim == 1536


@pytest.mark.parametrize("depth", [18, 50, 200])
def test_parameter_counts_match_torchvision_and_timm(tc, depth):
    torch = tc.torch
    with torch.device("meta"):  # shapes only, no initialisation
        if depth == 200:
            ref = tc.timm.create_model("resnet200", num_classes=0)
        else:
            ref = getattr(tc.torchvision.models, f"resnet{depth}")()
            ref.fc = torch.nn.Identity()
    assert count(str(depth)) == sum(p.numel() for p in ref.parameters())


def test_parameter_counts_match_the_simclr_papers():
    # SimCLR (Chen et al. 2020a), Table 6: ResNet-50 (2x) 94M, (4x) 375M: every channel count,
    # stem included, is multiplied. SimCLRv2 (Chen et al. 2020b): ResNet-152 (3x+SK) 795M.
    assert round(count("50x2") / 1e6) == 94
    assert round(count("50x4") / 1e6) == 375
    assert round(count("152x3-sk") / 1e6) == 795


def test_initialisation_and_zero_init_last_bn():
    x = jnp.zeros((2, 8, 8, 16))
    key = jax.random.key(0, impl="rbg")  # cheaper to compile than threefry; same distributions
    sk = resnet.Block(planes=16, stride=2, bottleneck=True, sk=True, zero_init_last_bn=True)
    params = jax.jit(functools.partial(sk.init, train=False))(key, x)["params"]
    # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"): std sqrt(2 / fan_out)
    k = np.asarray(params["conv2"]["conv"]["kernel"])  # [3, 3, 16, 32]
    assert abs(k.std() / math.sqrt(2.0 / (9 * 32)) - 1) < 0.05
    assert np.all(params["bn3"]["scale"] == 0.0)  # the last BN of the branch only
    for bn in (params["bn1"], params["conv2"]["bn"], params["downsample_bn"]):
        assert np.all(bn["scale"] == 1.0) and not np.any(bn["bias"])
    assert "bn2" not in params  # the selective kernel holds the 3x3's BN
    basic = resnet.Block(planes=16, bottleneck=False, zero_init_last_bn=True)
    params = jax.jit(functools.partial(basic.init, train=False))(key, x)["params"]
    assert np.all(params["bn2"]["scale"] == 0.0) and np.all(params["bn1"]["scale"] == 1.0)
    assert "downsample_conv" not in params  # same shape: identity shortcut (torchvision)
    assert resnet.Model().zero_init_last_bn is False


def test_cifar_stem_shapes_and_parameters():
    """solo-learn's CIFAR stem: one 3x3/1 conv with padding 2 (32 px -> 34), no max-pool, so the
    stages sit at strides 1, 2, 4, 8 of the 34-px map; only conv1's kernel changes."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    model = resnet.Model(variant="18", cifar_stem=True)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    params = variables["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 3, 64)
    assert sorted(params) == sorted(abstract_variables("18")["params"])  # no other stem params
    assert (
        count("18") - sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
        == (7 * 7 - 3 * 3) * 3 * 64
    )
    out = jax.eval_shape(model.apply, variables, x)
    assert out.intermediates["stem"].shape == (2, 34, 34, 64)
    assert [m.shape[1:] for m in out.feature_maps] == [
        (34, 34, 64),
        (17, 17, 128),
        (9, 9, 256),
        (5, 5, 512),
    ]
    assert out.pooled.shape == (2, 512)
    # The SK variant's deep stem gives way to the same single conv.
    sk = resnet.Model(variant="50x2-sk", cifar_stem=True, blocks=(1, 1, 1, 1))
    sk_params = jax.eval_shape(sk.init, jax.random.key(0), x)["params"]
    assert "stem_conv1" not in sk_params and sk_params["conv1"]["kernel"].shape == (3, 3, 3, 128)
    # Sparse masks live on the stride-32 grid, which the CIFAR stem does not have.
    assert model.mask_modes == ()
    with pytest.raises(UserError, match="mask mode 'sparse' is not supported"):
        jax.eval_shape(
            functools.partial(model.apply, mask=Mask(jnp.zeros((2, 1, 1), bool), "sparse")),
            variables,
            x,
        )


def test_blocks_and_channels_make_a_tiny_resnet():
    tiny = resnet.Model(variant="50", blocks=(1, 1, 1, 1), channels=8)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(tiny.init, jax.random.key(0), x)
    params = variables["params"]
    assert sorted(params) == ["bn1", "conv1", "layer1_0", "layer2_0", "layer3_0", "layer4_0"]
    assert params["conv1"]["kernel"].shape == (7, 7, 3, 8)
    assert params["layer4_0"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert tiny.embed_dim == 256
    assert jax.eval_shape(tiny.apply, variables, x).pooled.shape == (2, 256)
    # channels is the base before the width multiplier, as 64 is.
    assert resnet.Model(variant="18x2", channels=8).embed_dim == 2 * 8 * 8
    for bad in ({"blocks": (1, 1, 1)}, {"blocks": (1, 0, 1, 1)}, {"channels": 7}):
        with pytest.raises(UserError, match="blocks must be|channels must be"):
            resnet.Model(variant="18", **bad)


def test_a_backbone_name_override_names_the_other_family():
    """`--config.backbone.name=resnet` on a ViT config keeps the ViT's keys: the error says so."""
    from selfsup import backbones

    with pytest.raises(UserError) as e:
        backbones.build("resnet", variant="Ti/8", depth=1, width=32, num_heads=2)
    message = str(e.value)
    assert "\n" not in message
    assert "unknown key 'depth'" in message and "backbone 'vit'" in message
    assert "config.backbone.name" in message and "cifar_stem" in message  # the valid keys
    with pytest.raises(UserError, match="unknown key 'blocks', a setting of backbone 'resnet'"):
        backbones.build("convnext", variant="atto", blocks=(1, 1, 1, 1), cifar_stem=True)
    # A key no family has stays the plain unknown-key error.
    with pytest.raises(UserError, match="unknown key 'nope'; valid keys"):
        backbones.build("resnet", nope=1)


def test_quality_benchmark_offers_the_cifar_resnet_at_32_px():
    """`benchmarks/quality.py --set OBJ.backbone=resnet18_cifar` trains solo-learn's CIFAR
    ResNet-18 on the data's 32 px (not upsampled) for every objective with per-backbone views."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    for name, objective in quality.OBJECTIVES.items():
        if not isinstance(objective["views"], dict):
            continue
        config = quality.train_config(objective, "resnet18_cifar", images_seen=256)
        assert config["backbone"]["cifar_stem"] is True, name
        assert all(v.startswith("rrc(32,") or v.startswith("rrc(16,") for v in config["views"])
    assert "resnet18_cifar" in quality.SUPERVISED["optim"]


# ---------------------------------------------------------------- NumPy float64 references


def np_conv(x, kernel, stride=1):
    """[B, H, W, Cin] x [k, k, Cin, Cout] -> [B, H', W', Cout], symmetric padding (k-1)/2."""
    k = kernel.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))
    return np.einsum("bhwcij,ijco->bhwo", windows[:, ::stride, ::stride], kernel)


def np_bn_stats(x, keep=None):
    """(mean, biased variance) over all axes but the last, on kept positions only (keep: bool
    [B, H, W] or None)."""
    kept = x.reshape(-1, x.shape[-1]) if keep is None else x[keep]
    mu = kept.mean(0)
    return mu, ((kept - mu) ** 2).mean(0)


def np_batchnorm(x, params, keep=None):
    """Training-mode BatchNorm with statistics over kept positions only."""
    mu, var = np_bn_stats(x, keep)
    return (x - mu) / np.sqrt(var + EPS) * params["scale"] + params["bias"]


def np_selective_kernel(x, p, stride, keep=None):
    """SimCLRv2's SK unit (tf2 resnet.py, SK_Conv2D) in training mode; keep: [B, H', W'] or
    None. Masked positions are zero after every conv and norm; the spatial mean is over kept
    positions."""
    y = np_conv(x, p["conv"]["kernel"], stride)
    m = np.ones(y.shape[:-1], bool) if keep is None else keep
    y = np.where(m[..., None], y, 0.0)
    y = np_batchnorm(y, p["bn"], m)
    y = np.maximum(np.where(m[..., None], y, 0.0), 0.0)
    c = y.shape[-1] // 2
    a, b = y[..., :c], y[..., c:]
    g = ((a + b) * m[..., None]).sum((1, 2)) / m.sum((1, 2))[:, None]  # [B, C]
    z = g @ p["fc1"]["kernel"][0, 0]
    z = np.maximum(np_batchnorm(z, p["fc_bn"]), 0.0)
    logits = z @ p["fc2"]["kernel"][0, 0]  # [B, 2C]
    la, lb = logits[:, :c], logits[:, c:]
    wa = 1.0 / (1.0 + np.exp(lb - la))  # softmax over the two branches
    return a * wa[:, None, None] + b * (1.0 - wa)[:, None, None]


def np_resnet_d_pool(x, stride):
    """TF's AvgPooling2D(2, stride 1, 'SAME') (mean of in-bounds cells) or, for stride 2,
    zero-padding of one row/column after followed by a 2x2 'VALID' average."""
    b, h, w, c = x.shape
    ho, wo = (h, w) if stride == 1 else ((h + 1 - 2) // 2 + 1, (w + 1 - 2) // 2 + 1)
    out = np.zeros((b, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            cells = x[:, i * stride : i * stride + 2, j * stride : j * stride + 2]
            n = cells.shape[1] * cells.shape[2] if stride == 1 else 4
            out[:, i, j] = cells.sum((1, 2)) / n
    return out


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("stride", [1, 2])
def test_selective_kernel_matches_numpy(stride):
    sk = resnet.SelectiveKernel(channels=16, stride=stride)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 8)).astype(np.float32)
    init = functools.partial(sk.init, train=False)
    variables = randomize(jax.eval_shape(init, jax.random.key(0), x))
    keep_grid = np.array([[[True, False], [True, True]], [[False, True], [True, False]]])
    assert resnet.sk_mid_dim(16) == 32  # max(16 * 0.0625, 32)
    fn = jax.jit(lambda v, x, keep: sk.apply(v, x, train=True, keep=keep, mutable=["batch_stats"]))
    outs = []
    for keep in (None, keep_grid):
        out, _ = fn(variables, x, keep)
        f = 8 // stride // 2
        keep_out = None if keep is None else keep.repeat(f, 1).repeat(f, 2)
        want = np_selective_kernel(x.astype(np.float64), f64(variables["params"]), stride, keep_out)
        assert out.shape == (2, 8 // stride, 8 // stride, 16)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
        outs.append(np.asarray(out))
    assert rel_err(outs[1], outs[0]) > 1e-2


@pytest.mark.parametrize("size", [6, 7])
def test_resnet_d_pool_matches_tensorflow_semantics(size):
    x = images(size, seed=6)
    for stride in (1, 2):
        got = resnet.resnet_d_pool(jnp.asarray(x), stride)
        np.testing.assert_allclose(got, np_resnet_d_pool(x.astype(np.float64), stride), atol=1e-6)


# ---------------------------------------------------------------- sparse masks (SparK)

SPARSE_SIZE = 64  # a 2 x 2 grid of stride-32 cells
MASKED = np.array([[[False, True], [False, False]], [[True, False], [False, True]]])


@pytest.fixture(scope="module")
def sparse_run():
    """(variables, fn) of ResNet-50-SK (bottlenecks, selective kernels, deep stem, ResNet-D):
    fn(variables, images) -> (Features, {intermediates: conv outputs, batch_stats}) in training
    mode under the MASKED sparse mask."""
    model = resnet.Model(variant="50-sk")
    mask = Mask(jnp.asarray(MASKED), "sparse")
    fn = jax.jit(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            mask=mask,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
        )
    )
    return randomize(abstract_variables("50-sk")), fn


def keep_at(size: int) -> np.ndarray:
    """The keep mask [B, size, size] of MASKED at a map of side `size`."""
    f = size // MASKED.shape[1]
    return ~MASKED.repeat(f, 1).repeat(f, 2)


def test_sparse_masked_pixels_change_no_output(sparse_run):
    variables, fn = sparse_run
    x = images(SPARSE_SIZE, seed=7)
    noise = images(SPARSE_SIZE, seed=8) * 5.0
    changed = np.where(keep_at(SPARSE_SIZE)[..., None], x, noise)
    out, state = fn(variables, x)
    out2, state2 = fn(variables, changed)
    maps = [*out.feature_maps, out.intermediates["stem"]]
    maps2 = [*out2.feature_maps, out2.intermediates["stem"]]
    for a, b in zip(maps, maps2, strict=True):
        np.testing.assert_array_equal(a, b)  # every stage, kept and masked positions
        assert not np.any(np.asarray(a)[~keep_at(a.shape[1])])  # masked positions are zero
        assert np.abs(np.asarray(a)[keep_at(a.shape[1])]).max() > 0
    np.testing.assert_array_equal(out.pooled, out2.pooled)
    for k, v in leaves(state["batch_stats"]).items():
        np.testing.assert_array_equal(v, leaves(state2["batch_stats"])[k], err_msg=k)
    # The same change to kept pixels does change the outputs.
    visible = np.where(keep_at(SPARSE_SIZE)[..., None], noise, x)
    assert rel_err(fn(variables, visible)[0].pooled, out.pooled) > 1e-2


def test_sparse_pooled_is_the_mean_over_kept_positions(sparse_run):
    variables, fn = sparse_run
    out, _ = fn(variables, images(SPARSE_SIZE, seed=9))
    last = np.asarray(out.feature_maps[-1], np.float64)  # [B, 2, 2, C] = the mask's grid
    keep = ~MASKED[..., None]
    want = (last * keep).sum((1, 2)) / keep.sum((1, 2))
    np.testing.assert_allclose(out.pooled, want, rtol=1e-5, atol=1e-6)
    assert rel_err(last.mean((1, 2)), want) > 1e-2


def _producer(path: str) -> str:
    """The conv whose (masked) output a BatchNorm normalises."""
    head, _, last = path.rpartition("/")
    conv = {"bn": "conv", "fc_bn": "fc1", "downsample_bn": "downsample_conv"}.get(last)
    conv = conv or last.replace("bn", "conv")
    return f"{head}/{conv}" if head else conv


def test_sparse_batchnorm_statistics_are_over_kept_positions(sparse_run):
    variables, fn = sparse_run
    _, state = fn(variables, images(SPARSE_SIZE, seed=10))
    old, new = leaves(variables["batch_stats"]), leaves(state["batch_stats"])
    captured = leaves(state["intermediates"])
    checked = 0
    for key in sorted(new):
        path, stat = key.rsplit("/", 1)
        if stat != "mean":
            continue
        y = captured[f"{_producer(path)}/__call__/0"].astype(np.float64)  # [B, H, W, C]
        keep = None if y.shape[1] == 1 else keep_at(y.shape[1])
        mu, var = np_bn_stats(y, keep)
        np.testing.assert_allclose(new[key], 0.9 * old[key] + 0.1 * mu, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            new[f"{path}/var"], 0.9 * old[f"{path}/var"] + 0.1 * var, rtol=1e-4, atol=1e-5
        )
        if keep is not None:  # statistics over all positions would be different
            assert np.abs(np_bn_stats(y)[0] - mu).max() > 1e-3, key
        checked += 1
    assert checked == len(new) // 2 > 50


def test_mask_errors_and_compute_dtype():
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)

    def apply(mask=None, images=x, **kw):
        model = resnet.Model(variant="18", **kw)
        return jax.eval_shape(
            functools.partial(model.apply, mask=mask), abstract_variables("18"), images
        )

    with pytest.raises(UserError, match="mask mode 'drop'"):
        apply(Mask(jnp.zeros((2, 4), jnp.int32), "drop"))
    with pytest.raises(UserError, match=r"\[B, H/32, W/32\]"):
        apply(Mask(jnp.zeros((2, 4, 4), bool), "sparse"))
    with pytest.raises(UserError, match="divisible by 32"):
        apply(
            Mask(jnp.zeros((2, 1, 1), bool), "sparse"),
            jax.ShapeDtypeStruct((2, 48, 48, 3), jnp.float32),
        )
    # bfloat16 compute: float32 parameters and statistics, bfloat16 features.
    out = apply(dtype=jnp.bfloat16)
    assert out.pooled.dtype == jnp.bfloat16 and out.feature_maps[0].dtype == jnp.bfloat16
    shapes = jax.eval_shape(
        resnet.Model(variant="18", dtype=jnp.bfloat16).init, jax.random.key(0), x
    )
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))


# ---------------------------------------------------------------- BatchNorm over 8 devices

EIGHT_DEVICES = r"""
import json, jax, jax.numpy as jnp, numpy as np
from selfsup.parallel import sharding
from selfsup.backbones import Mask, resnet

model = resnet.Model(variant="18")
rng = np.random.default_rng(0)
# Each sample has its own scale, so per-device statistics would differ from global ones.
x = rng.normal(size=(16, 64, 64, 3)) * np.linspace(0.2, 4.0, 16)[:, None, None, None]
x = x.astype(np.float32)
masked = rng.random((16, 2, 2)) < 0.4
masked[:, 0, 0] = False
shapes = jax.eval_shape(model.init, jax.random.key(0), x)
variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
                         * (1 if len(s.shape) == 1 else 0.1), shapes)

def forward(v, x, m):
    out, upd = model.apply(v, x, train=True, mask=Mask(m, "sparse"), mutable=["batch_stats"])
    return out.pooled, out.feature_maps[0], upd["batch_stats"]

res = {}
for name, devices in [("one", jax.devices()[:1]), ("eight", jax.devices())]:
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices)
    batch = sharding.batch_sharding(mesh)
    args = (jax.device_put(variables, sharding.replicated(mesh)),
            jax.device_put(x, batch), jax.device_put(masked, batch))
    assert len(args[1].sharding.device_set) == len(devices)
    res[name] = jax.tree.map(np.asarray, jax.jit(forward)(*args))
one, eight = jax.tree.leaves(res["one"]), jax.tree.leaves(res["eight"])
err = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(one, eight))
print(json.dumps({"err": err, "leaves": len(one), "devices": len(jax.devices())}))
"""

EIGHT_DEVICE_CHECKS = {"resnet_batchnorm": EIGHT_DEVICES}


def test_batchnorm_statistics_are_global_over_eight_devices(eight_devices):
    out = json.loads(eight_devices("resnet_batchnorm"))
    assert out["devices"] == 8 and out["leaves"] == 2 + 2 * 20  # pooled, map, 20 BN x 2 stats
    assert out["err"] < 1e-4, out
