"""SparK: mask generator, loss and transposed-conv upsampling against NumPy float64 references
written from the paper and the official code's documented behaviour (and PyTorch's
ConvTranspose2d); the densify step; the sparse encoder path on ResNet and ConvNeXt; the decoder's
shape; the smoke config end to end with reconstruction images."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from selfsup import config as config_lib
from selfsup import objectives, ops
from selfsup.errors import UserError
from selfsup.objectives import spark
from selfsup.ops import conv
from selfsup.train import loop

IMG, B = 64, 2
CONVNEXT = dict(name="convnext", variant="atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))
RESNET = dict(name="resnet", variant="18")


# ---------------------------------------------------------------- NumPy float64 references


def ref_patches(images, p):
    """[B, H, W, C] -> [B, N, p*p*C], patches in raster order (element order is irrelevant to
    the loss as long as prediction and target share it)."""
    b, h, w, c = images.shape
    out = []
    for i in range(h // p):
        for j in range(w // p):
            out.append(images[:, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(b, -1))
    return np.stack(out, axis=1)


def ref_loss(pred, images, mask):
    """Paper Eq.: per-patch normalised target (mean, unbiased var, eps 1e-6), MSE per patch,
    averaged over masked patches (+1e-8)."""
    p = images.shape[1] // mask.shape[1]
    x, y = ref_patches(images, p), ref_patches(pred, p)
    n = x.shape[-1]
    mean = x.sum(-1, keepdims=True) / n
    var = ((x - mean) ** 2).sum(-1, keepdims=True) / (n - 1)
    target = (x - mean) / np.sqrt(var + 1e-6)
    per_patch = ((y - target) ** 2).mean(-1)
    m = mask.reshape(mask.shape[0], -1).astype(np.float64)
    return (per_patch * m).sum() / (m.sum() + 1e-8)


def ref_conv_transpose(x, weight, bias, stride=2, padding=1):
    """PyTorch ConvTranspose2d in NHWC, float64: every input pixel scatters weight[ci, co] into
    out[s*y - p + ky, s*x - p + kx]; out size (H - 1) s - 2p + k."""
    b, h, w, cin = x.shape
    _, cout, k, _ = weight.shape
    oh, ow = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
    full = np.zeros((b, oh + 2 * padding, ow + 2 * padding, cout))
    for y in range(h):
        for xx in range(w):
            for ky in range(k):
                for kx in range(k):
                    full[:, stride * y + ky, stride * xx + kx] += x[:, y, xx] @ weight[:, :, ky, kx]
    return full[:, padding : padding + oh, padding : padding + ow] + bias


# ---------------------------------------------------------------- the mask generator


@pytest.mark.parametrize(
    "rows, cols, ratio, kept",
    [
        (7, 7, 0.6, 20),  # 224 px: round(49 x 0.4) = round(19.6)
        (6, 6, 0.6, 14),  # 192 px: round(14.4)
        (12, 12, 0.75, 36),  # the 384-px ConvNeXt-L recipe
        (2, 2, 0.6, 2),  # the smoke config's 64 px: round(1.6)
        (2, 3, 0.6, 2),  # non-square: round(2.4)
    ],
)
def test_mask_count_is_exact(rows, cols, ratio, kept):
    b = 64
    mask = np.asarray(spark.spark_mask(jax.random.key(0), b, rows, cols, ratio))
    assert mask.shape == (b, rows, cols) and mask.dtype == np.bool_
    assert spark.num_kept(rows * cols, ratio) == kept
    np.testing.assert_array_equal((~mask).reshape(b, -1).sum(1), np.full(b, kept))
    # Images get different masks (a 2x2 grid has only 6).
    assert len({m.tobytes() for m in mask}) >= min(b // 2, math.comb(rows * cols, kept))


def test_mask_cells_are_uniform_and_bad_grids_fail():
    mask = np.asarray(spark.spark_mask(jax.random.key(1), 4000, 4, 4, 0.6))
    # round(16 x 0.4) = 6 kept: each cell masked 10/16 of the time.
    np.testing.assert_allclose(mask.reshape(4000, -1).mean(0), 10 / 16, atol=0.03)
    with pytest.raises(UserError, match="keeps 0 of 1 cells"):
        spark.spark_mask(jax.random.key(0), 1, 1, 1, 0.6)  # 32 px: nothing would be kept
    with pytest.raises(UserError, match="keeps 4 of 4 cells"):
        spark.spark_mask(jax.random.key(0), 1, 2, 2, 0.1)


# ---------------------------------------------------------------- the loss


def test_spark_loss_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 64, 96, 3)) * 2 + 1
    pred = rng.normal(size=images.shape)
    mask = rng.random((3, 2, 3)) < 0.5
    got = spark.spark_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), ref_loss(pred, images, mask), rtol=1e-5)
    # A perfect prediction of the normalised patches gives 0.
    x = spark.patchify(jnp.asarray(images, jnp.float32), 32)
    perfect = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True, ddof=1) + 1e-6)
    perfect = spark.unpatchify(perfect, 32, 64, 96)
    assert float(spark.spark_loss(perfect, jnp.asarray(images), jnp.asarray(mask))) < 1e-9


def test_loss_ignores_predictions_at_visible_patches():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    pred = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)
    mask = jnp.asarray([[[True, False], [False, True]], [[False, False], [True, False]]])
    base = spark.spark_loss(pred, images, mask)
    visible = ~np.repeat(np.repeat(np.asarray(mask), 32, 1), 32, 2)[..., None]
    moved = pred + 100.0 * jnp.asarray(visible)
    np.testing.assert_allclose(spark.spark_loss(moved, images, mask), base, rtol=1e-6)
    assert float(spark.spark_loss(pred + 100.0 * jnp.asarray(~visible), images, mask)) > 1e3


# ---------------------------------------------------------------- the decoder's upsampling


def ref_conv_transpose_grads(x, weight, g, stride=2, padding=1):
    """Gradients of sum(ref_conv_transpose(x, weight, bias) * g) with respect to x and weight,
    float64: each input pixel's scattered window of the padded output gradient."""
    b, h, w, cin = x.shape
    k = weight.shape[-1]
    full = np.pad(g, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dx, dweight = np.zeros_like(x), np.zeros_like(weight)
    for y in range(h):
        for xx in range(w):
            for ky in range(k):
                for kx in range(k):
                    window = full[:, stride * y + ky, stride * xx + kx]  # [B, cout]
                    dx[:, y, xx] += window @ weight[:, :, ky, kx].T
                    dweight[:, :, ky, kx] += x[:, y, xx].T @ window
    return dx, dweight


@pytest.mark.parametrize("size", [(3, 5), (1, 1), (2, 2)])
def test_upsample_is_pytorch_conv_transpose_k4_s2_p1(size):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, *size, 4))
    weight = rng.normal(size=(4, 6, 4, 4))  # PyTorch layout [in, out, kh, kw]
    bias = rng.normal(size=6)
    g = rng.normal(size=(2, 2 * size[0], 2 * size[1], 6))
    layer = spark.Upsample(6)
    params = {"kernel": jnp.asarray(weight.transpose(2, 3, 1, 0), jnp.float32), "bias": bias}
    x32 = jnp.asarray(x, jnp.float32)
    got = np.asarray(layer.apply({"params": params}, x32))
    assert got.shape == (2, 2 * size[0], 2 * size[1], 6)
    np.testing.assert_allclose(got, ref_conv_transpose(x, weight, bias), atol=1e-5)
    # Values and both gradients in both forms: the CPU's phase dots, XLA's transposed conv.
    want_dx, want_dweight = ref_conv_transpose_grads(x, weight, g)
    want_dkernel = want_dweight.transpose(2, 3, 1, 0)
    for form in ("cpu", "reference"):
        with ops.forms(form):
            y, vjp = jax.vjp(conv.conv_transpose_4x4_s2, x32, params["kernel"])
            dx, dkernel = vjp(jnp.asarray(g, jnp.float32))
        np.testing.assert_allclose(y + bias, got, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(dkernel, want_dkernel, rtol=1e-5, atol=1e-4)
    # The CPU program holds no convolution: XLA:CPU runs the stride-dilated one slowly.
    hlo = jax.jit(jax.grad(lambda x, k: (conv.conv_transpose_4x4_s2(x, k) * g).sum(), (0, 1)))
    assert " convolution(" not in hlo.lower(x32, params["kernel"]).compile().as_text()
    # And PyTorch itself.
    torch = pytest.importorskip("torch")
    layer = torch.nn.ConvTranspose2d(4, 6, kernel_size=4, stride=2, padding=1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
        want = layer(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------- densify


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_densify_norms_kept_positions_and_fills_mask_tokens(norm):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 4, 5)) * 3 + 2
    kept = rng.random((2, 4, 4, 1)) < 0.5
    x = np.where(kept, x, 0.0)  # the encoder's maps are 0 at masked positions
    layer = spark.Densify(norm, None, 1)
    variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32), kept, train=False)
    out, _ = layer.apply(
        variables, jnp.asarray(x, jnp.float32), kept, train=True, mutable=["batch_stats"]
    )
    out = np.asarray(out)
    token = np.asarray(variables["params"]["mask_token"])
    assert np.all(np.abs(token) <= 0.02) and np.any(token != 0)
    np.testing.assert_array_equal(
        out[~kept[..., 0]], np.broadcast_to(token, out[~kept[..., 0]].shape)
    )
    v = x[kept[..., 0]]  # [n_kept, C]
    if norm == "bn":  # statistics over kept positions of the whole batch
        want = (v - v.mean(0)) / np.sqrt(v.var(0) + 1e-5)
    else:  # over the channels of each position
        want = (v - v.mean(1, keepdims=True)) / np.sqrt(v.var(1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out[kept[..., 0]], want, atol=1e-4)


# ---------------------------------------------------------------- the objective


def build(backbone=CONVNEXT, **objective):
    return objectives.build({"name": "spark", "decoder_width": 64, **objective}, dict(backbone))


def images(seed=0, b=B):
    return jax.random.normal(jax.random.key(seed), (b, IMG, IMG, 3))


def init(model, x):
    # RBG keys: XLA compiles their random bits ~4x faster than threefry's on this CPU, and
    # compiling every parameter's init dominates these tests. The distributions are the same.
    rngs = {"params": jax.random.key(0, impl="rbg"), "mask": jax.random.key(1, impl="rbg")}
    return jax.jit(model.init, static_argnames="train")(rngs, (x,), train=False)


# Initialising compiles every parameter's random init: do it once per backbone for the module.
@pytest.fixture(scope="module")
def variables():
    return {"convnext": init(build(CONVNEXT), images()), "resnet": init(build(RESNET), images())}


def test_contract_and_build_errors():
    assert spark.Objective.num_views == 1 and "batch_stats" in spark.Objective.mutable
    with pytest.raises(UserError, match="mask mode 'sparse'"):
        objectives.build(dict(name="spark"), dict(name="vit", variant="Ti/16", depth=1))
    with pytest.raises(UserError, match="densify_norm"):
        build(densify_norm="gn")
    with pytest.raises(UserError, match="decoder_width"):
        build(decoder_width=16)
    with pytest.raises(UserError, match="not a multiple of 32"):
        jax.eval_shape(lambda: init(build(), jnp.zeros((1, 48, 64, 3))))


@pytest.mark.parametrize(
    "backbone, norm", [(RESNET, "bn"), (CONVNEXT, "ln")], ids=["resnet", "convnext"]
)
def test_decoder_shapes_and_auto_densify_norm(backbone, norm):
    model = build(backbone)
    shapes = jax.eval_shape(lambda: init(model, images()))
    params = shapes["params"]
    maps = jax.eval_shape(
        lambda v: model.apply(v, images(), jnp.zeros((B, 2, 2), bool), False, method="encode"),
        shapes,
    )
    widths = [m.shape[-1] for m in maps]
    assert [m.shape[1] for m in maps] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
    for i in range(4):  # smallest map first; 1x1 projection there, 3x3 elsewhere
        d = params[f"densify_{i}"]
        assert d["mask_token"].shape == (widths[3 - i],)
        assert d["proj"]["kernel"].shape == (1 if i == 0 else 3,) * 2 + (widths[3 - i], 64 >> i)
    assert ("densify_0" in shapes["batch_stats"]) == (norm == "bn")
    assert "scale" in params["densify_0"]["norm"] and len(params["decoder"]) == 6
    for i in range(5):  # width halves per block: 64 -> 32 -> ... -> 2, then 1x1 to 3 channels
        block = params["decoder"][f"blocks_{i}"]
        cin = 64 >> i
        assert block["up"]["kernel"].shape == (4, 4, cin, cin)
        assert block["conv1"]["kernel"].shape == (3, 3, cin, cin)
        assert block["conv2"]["kernel"].shape == (3, 3, cin, cin // 2)
    assert params["decoder"]["proj"]["kernel"].shape == (1, 1, 2, 3)
    # Equal encoder and decoder widths at stride 32: the official identity projection.
    same = jax.eval_shape(lambda: init(build(backbone, decoder_width=widths[3]), images()))
    assert "proj" not in same["params"]["densify_0"] and "proj" in same["params"]["densify_1"]


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_masked_pixels_never_reach_kept_features(family, variables):
    model, x = build(RESNET if family == "resnet" else CONVNEXT), images(1)
    mask = jnp.asarray([[[True, False], [False, True]], [[False, True], [True, True]]])
    cells = np.repeat(np.repeat(np.asarray(mask), 32, 1), 32, 2)[..., None]
    noise = jax.random.normal(jax.random.key(9), x.shape) * 5

    @jax.jit
    def encode(x):  # training mode: BatchNorm statistics from this batch's kept positions
        maps, _ = model.apply(
            variables[family], x, mask, True, method="encode", mutable=["batch_stats"]
        )
        return maps

    base = encode(x)
    other = encode(jnp.where(cells, noise, x))  # only masked pixels change
    control = encode(jnp.where(cells, x, noise))  # only kept pixels change
    for stage, (a, b, c) in enumerate(zip(base, other, control, strict=True)):
        a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
        f = a.shape[1] // 2
        kept = ~np.repeat(np.repeat(np.asarray(mask), f, 1), f, 2)
        np.testing.assert_allclose(b[kept], a[kept], atol=1e-6, err_msg=f"stage {stage}")
        assert np.all(a[~kept] == 0), stage
        assert np.abs(c[kept] - a[kept]).max() > 1e-3, stage


def test_reconstruction_images(variables):
    model, x = build(), images(2)
    keys = {"mask": jax.random.key(5)}

    @jax.jit
    def run(variables):
        mask = model.apply(variables, x, method="sample_mask", rngs=keys)
        pred = model.apply(variables, x, mask, False, method="predict")
        return mask, pred, model.apply(variables, (x,), method="reconstruct", rngs=keys)

    mask, pred, out = jax.tree.map(np.asarray, run(variables["convnext"]))
    assert mask.shape == (B, 2, 2) and mask.sum() == B * 2  # 2 of 4 cells masked per image
    on = np.repeat(np.repeat(mask, 32, 1), 32, 2)
    xs = np.asarray(x)
    assert set(out) == {"original", "masked", "reconstruction"}
    np.testing.assert_array_equal(out["original"], xs)
    np.testing.assert_array_equal(out["masked"][on], 0.0)
    np.testing.assert_array_equal(out["masked"][~on], xs[~on])
    np.testing.assert_array_equal(out["reconstruction"][~on], xs[~on])
    # Masked cells: the prediction de-normalised with the original patch's mean and std.
    patches = ref_patches(xs.astype(np.float64), 32)
    mean = patches.mean(-1, keepdims=True)
    std = np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    want = ref_patches(pred, 32) * std + mean
    got = ref_patches(out["reconstruction"], 32)
    masked_patches = mask.reshape(B, -1)
    np.testing.assert_allclose(got[masked_patches], want[masked_patches], atol=1e-4)
    assert np.abs(got[masked_patches] - patches[masked_patches]).max() > 1e-2  # not the input


def test_init_follows_the_official_code(variables):
    params = jax.tree.map(np.asarray, variables["convnext"]["params"])
    for i in range(4):
        d = params[f"densify_{i}"]
        assert np.all(np.abs(d["mask_token"]) <= 0.02) and d["mask_token"].std() > 0.005
        # PyTorch's default Conv2d init: U(+-1/sqrt(fan_in)), the bias too.
        k = d["proj"]["kernel"]
        bound = 1 / np.sqrt(np.prod(k.shape[:3]))
        assert bound * 0.9 < np.abs(k).max() <= bound
        assert np.abs(d["proj"]["bias"]).max() <= bound and np.any(d["proj"]["bias"] != 0)
    up = params["decoder"]["blocks_0"]["up"]  # He normal over fan_out = 16 x 64
    np.testing.assert_allclose(up["kernel"].std(), np.sqrt(2 / (16 * 64)), rtol=0.05)
    np.testing.assert_array_equal(up["bias"], 0)
    np.testing.assert_allclose(
        params["decoder"]["blocks_0"]["conv1"]["kernel"].std(), 0.02, rtol=0.05
    )
    np.testing.assert_array_equal(params["decoder"]["proj"]["bias"], 0)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow  # end to end through the loop
def test_smoke_config_trains_and_writes_images(tmp_path):
    path = REPO / "configs" / "spark_convnext_in1k.py"
    config = config_lib.resolve(config_lib.load(f"{path}:smoke"), {"num_images": "2"})
    out = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(out["loss"]) and out["train_step_compilations"] == 1
    assert out["mask_ratio_actual"] == 0.5  # 2 of the 2x2 cells of a 64-px image
    png = Image.open(tmp_path / "images" / f"reconstruction_{config.total_steps:07d}.png")
    assert 1.4 < png.width / png.height < 1.6  # 2 rows: original | masked | reconstruction
    # Both families' smoke configs exist for test_train and the shared objective tests.
    for family in ("resnet", "convnext"):
        c = config_lib.resolve(config_lib.load(f"{REPO}/configs/spark_{family}_in1k.py:smoke"))
        assert c.backbone.name == family and c.objective.name == "spark"
        assert c.data.image_size % 32 == 0 and c.data.image_size >= 64
