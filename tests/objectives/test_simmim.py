"""SimMIM: mask generator, pixel shuffle, decoder and loss against NumPy float64 references
written from the paper and the official code's documented behaviour; the objective's wiring
(mask token, final LayerNorm -> 1x1 conv -> pixel shuffle); the smoke config end to end with a
resume and reconstruction images."""

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from selfsup import config as config_lib
from selfsup import objectives
from selfsup.backbones import Mask, vit
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.objectives import simmim
from selfsup.train import loop
from selfsup.train import step as step_lib

IMG, PATCH, MASK_PATCH, B = 32, 4, 8, 2
BACKBONE = dict(variant=f"Ti/{PATCH}", width=32, depth=1, num_heads=2)


# ---------------------------------------------------------------- NumPy float64 references


def ref_loss(pred, images, pixel_mask):
    """Official: (|x - x_rec| * mask).sum() / (mask.sum() + 1e-5) / in_chans."""
    l1 = np.abs(images - pred) * pixel_mask[..., None]
    return l1.sum() / (pixel_mask.sum() + 1e-5) / images.shape[-1]


def ref_pixel_shuffle(x, r):
    """PyTorch's PixelShuffle, NHWC: out[b, y*r + i, x*r + j, c] = in[b, y, x, c*r*r + i*r + j]."""
    b, h, w, d = x.shape
    c = d // (r * r)
    out = np.zeros((b, h * r, w * r, c))
    for y in range(h):
        for xx in range(w):
            for i in range(r):
                for j in range(r):
                    for ch in range(c):
                        out[:, y * r + i, xx * r + j, ch] = x[:, y, xx, ch * r * r + i * r + j]
    return out


# ---------------------------------------------------------------- the mask generator


@pytest.mark.parametrize(
    "size, mask_patch, model_patch, ratio, count",
    [
        ((224, 224), 32, 16, 0.6, 30),  # ViT-B/16 recipe: 49 cells, ceil(29.4)
        ((192, 192), 32, 4, 0.6, 22),  # Swin recipe: 36 cells, ceil(21.6)
        ((32, 32), 8, 4, 0.6, 10),  # 16 cells, ceil(9.6)
        ((32, 48), 8, 8, 0.5, 12),  # non-square, 24 cells
    ],
)
def test_mask_count_is_exact(size, mask_patch, model_patch, ratio, count):
    b = 64
    mask = np.asarray(
        simmim.simmim_mask(jax.random.key(0), b, size, mask_patch, model_patch, ratio)
    )
    scale = mask_patch // model_patch
    rows, cols = size[0] // mask_patch, size[1] // mask_patch
    assert mask.shape == (b, rows * scale, cols * scale) and mask.dtype == np.bool_
    cells = mask[:, ::scale, ::scale]
    # Upsampled: every model patch inside a mask cell has the cell's value.
    np.testing.assert_array_equal(mask, cells.repeat(scale, 1).repeat(scale, 2))
    np.testing.assert_array_equal(cells.reshape(b, -1).sum(1), np.full(b, count))
    assert len({m.tobytes() for m in cells}) > b // 2  # images get different masks


def test_mask_cells_are_uniform():
    mask = np.asarray(simmim.simmim_mask(jax.random.key(1), 4000, 32, 8, 8, 0.6))
    freq = mask.reshape(4000, -1).mean(0)  # each of 16 cells is masked 10/16 of the time
    np.testing.assert_allclose(freq, 10 / 16, atol=0.03)


def test_mask_size_errors():
    with pytest.raises(UserError, match="not a multiple of mask_patch_size"):
        simmim.simmim_mask(jax.random.key(0), 1, 40, 32, 16, 0.6)
    with pytest.raises(UserError, match="not a multiple of the backbone's patch"):
        simmim.simmim_mask(jax.random.key(0), 1, 64, 32, 12, 0.6)


# ---------------------------------------------------------------- pure functions


def test_pixel_shuffle_matches_pytorch_definition():
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 3 * 4 * 4)).astype(np.float32)
    np.testing.assert_array_equal(simmim.pixel_shuffle(jnp.asarray(x), 4), ref_pixel_shuffle(x, 4))


def test_simmim_loss_matches_numpy():
    r = np.random.default_rng(0)
    pred, images = r.normal(size=(3, 8, 12, 3)), 2.0 * r.normal(size=(3, 8, 12, 3))
    mask = r.random((3, 8, 12)) < 0.6
    got = simmim.simmim_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref_loss(pred, images, mask.astype(float)), rtol=1e-5)
    assert simmim.simmim_loss(jnp.asarray(pred), jnp.asarray(images), jnp.zeros((3, 8, 12))) == 0


def test_loss_ignores_visible_pixels():
    r = np.random.default_rng(1)
    pred, images = (
        jnp.asarray(r.normal(size=(2, 8, 8, 3))),
        jnp.asarray(r.normal(size=(2, 8, 8, 3))),
    )
    mask = jnp.asarray(r.random((2, 8, 8)) < 0.5)
    base = simmim.simmim_loss(pred, images, mask)
    moved = jnp.where(mask[..., None], pred, pred + 9.0)  # every visible prediction changes
    np.testing.assert_allclose(simmim.simmim_loss(moved, images, mask), base, rtol=1e-6)
    moved = jnp.where(mask[..., None], pred + 9.0, pred)
    assert abs(float(simmim.simmim_loss(moved, images, mask)) - float(base)) > 1.0


# ---------------------------------------------------------------- the objective


def objective(**kw):
    return simmim.Objective(vit.Model(**BACKBONE), **{"mask_patch_size": MASK_PATCH, **kw})


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, IMG, IMG, 3))


@pytest.fixture(scope="module")
def params():
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    return jax.jit(objective().init, static_argnames="train")(rngs, (images(),), train=False)[
        "params"
    ]


@jax.jit
def sample_mask(params, x, seed):
    rngs = {"mask": jax.random.key(seed)}
    m = objective()
    return m.apply({"params": params}, (x,), rngs=rngs, method=lambda o, v: o.sample_mask(v[0]))


@jax.jit
def predict(params, x, mask):
    m = objective()
    return m.apply({"params": params}, x, mask, False, method=m.predict)


def test_contract_and_build_errors():
    assert simmim.Objective.num_views == 1 and "mask" in simmim.Objective.rng_streams
    for ratio in (0.0, 1.0):
        with pytest.raises(UserError, match="mask_ratio"):
            objective(mask_ratio=ratio)
    with pytest.raises(UserError, match="multiple of the backbone's patch size 4"):
        objective(mask_patch_size=10)

    class NoReplace(nn.Module):
        mask_modes = ("drop",)

    with pytest.raises(UserError, match="mask mode 'replace'"):
        simmim.Objective(NoReplace())
    built = objectives.build({"name": "simmim", "mask_patch_size": 8}, {"name": "vit", **BACKBONE})
    assert isinstance(built, simmim.Objective) and built.mask_ratio == 0.6


def test_decoder_is_a_1x1_conv_and_pixel_shuffle_of_the_normed_tokens(params):
    """Every pixel is predicted from its own patch's final (LayerNormed) token."""
    x = images()
    mask = sample_mask(params, x, 3)
    pred = np.asarray(predict(params, x, mask))
    assert pred.shape == x.shape  # the decoder output covers every pixel
    feats = jax.jit(vit.Model(**BACKBONE).apply)(
        {"params": params["backbone"]}, x, mask=Mask(mask.reshape(B, -1), "replace")
    )
    tokens = np.asarray(feats.tokens, np.float64).reshape(B, IMG // PATCH, IMG // PATCH, -1)
    # The final LayerNorm's output: zero mean per token before its scale and bias.
    ln = params["backbone"]["norm"]
    raw = (tokens - np.asarray(ln["bias"])) / np.asarray(ln["scale"])
    np.testing.assert_allclose(raw.mean(-1), 0.0, atol=1e-4)
    dec = params["decoder"]
    kernel = np.asarray(dec["kernel"], np.float64)
    assert kernel.shape == (1, 1, 32, PATCH * PATCH * 3)
    want = ref_pixel_shuffle(tokens @ kernel[0, 0] + np.asarray(dec["bias"]), PATCH)
    np.testing.assert_allclose(pred, want, atol=1e-5)


def test_decoder_init_is_pytorch_default(params):
    bound = 1 / math.sqrt(32)  # PyTorch Conv2d default: U(+-1/sqrt(fan_in)), fan_in = width
    for leaf in (params["decoder"]["kernel"], params["decoder"]["bias"]):
        leaf = np.abs(np.asarray(leaf))
        assert leaf.max() <= bound and leaf.max() > 0.9 * bound


def test_masked_patches_reach_the_encoder_only_as_the_mask_token(params):
    x = images(1)
    mask = sample_mask(params, x, 4)
    pixels = np.asarray(mask).repeat(PATCH, 1).repeat(PATCH, 2)[..., None]
    assert 0 < pixels.mean() < 1
    noise = jax.random.normal(jax.random.key(9), x.shape)
    pred_x = predict(params, x, mask)
    # New content under the mask changes nothing; new visible content changes the predictions.
    under = predict(params, jnp.where(pixels, x + noise, x), mask)
    np.testing.assert_allclose(under, pred_x, atol=1e-5)
    visible = predict(params, jnp.where(pixels, x, x + noise), mask)
    assert np.abs(np.asarray(visible - pred_x)).max() > 1e-3


def test_forward_loss_and_reconstruction(params):
    m, x = objective(), images(2)
    rngs = {"mask": jax.random.key(5)}
    loss, metrics = jax.jit(lambda p, v: m.apply({"params": p}, v, train=True, rngs=rngs))(
        params, (x,)
    )
    mask = np.asarray(sample_mask(params, x, 5))
    assert mask.reshape(B, -1).sum(1).tolist() == [40, 40]  # 10 of 16 cells, 4 patches each
    pred = np.asarray(predict(params, x, mask), np.float64)
    pixels = mask.repeat(PATCH, 1).repeat(PATCH, 2).astype(float)
    np.testing.assert_allclose(loss, ref_loss(pred, np.asarray(x, np.float64), pixels), rtol=1e-5)
    assert metrics["loss"] == loss and metrics["mask_ratio_actual"] == 10 / 16

    out = jax.jit(lambda p, v: m.apply({"params": p}, v, rngs=rngs, method=m.reconstruct))(
        params, (x,)
    )
    assert {k: v.shape for k, v in out.items()} == {
        k: x.shape for k in ("original", "masked", "reconstruction")
    }
    on = pixels[..., None].repeat(3, -1) > 0
    xs = np.asarray(x)
    np.testing.assert_array_equal(out["original"], xs)
    np.testing.assert_array_equal(np.asarray(out["masked"])[~on], xs[~on])
    assert np.all(np.asarray(out["masked"])[on] == 0)
    np.testing.assert_array_equal(np.asarray(out["reconstruction"])[~on], xs[~on])
    np.testing.assert_allclose(np.asarray(out["reconstruction"])[on], pred[on], atol=1e-5)


# ---------------------------------------------------------------- the smoke config end to end


def smoke(**overrides):
    config = config_lib.load(str(REPO / "configs" / "simmim_vit_in1k.py:smoke"))
    # One block and two images keep the compiles short; test_train runs the config as it is.
    overrides = {"backbone.depth": 1, "num_images": 2, **overrides}
    return config_lib.resolve(config, {k: str(v) for k, v in overrides.items()})


def logged(workdir) -> dict[int, float]:
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow  # end to end through the loop
def test_smoke_config_trains_resumes_and_writes_images(tmp_path):
    # Randomness comes from the loop's named streams only, so a resumed run is the same run
    # (test_train checks that equality for the loop).
    assert objectives.contract(step_lib.build_model(smoke())).rng_streams == ("mask", "drop_path")
    loop.train_and_evaluate(smoke(total_steps=2), str(tmp_path))
    resumed = loop.train_and_evaluate(smoke(total_steps=3), str(tmp_path))
    assert np.isfinite(resumed["loss"]) and resumed["train_step_compilations"] == 1
    assert sorted(logged(tmp_path)) == [1, 2, 3]  # the second run did step 3 only
    assert checkpoint.Manager(tmp_path).latest_step() == 3
    # original | masked | reconstruction for 2 images of 32 px (2-px padding, upscaled 4x).
    grids = []
    for step in (2, 3):
        png = Image.open(tmp_path / "images" / f"reconstruction_{step:07d}.png")
        assert png.size == (4 * (3 * 34 + 2), 4 * (2 * 34 + 2))
        grids.append(np.asarray(png))
    width = grids[0].shape[1] // 3
    np.testing.assert_array_equal(grids[0][:, :width], grids[1][:, :width])  # same originals
    assert np.any(grids[0][:, 2 * width :] != grids[1][:, 2 * width :])  # the model moved
