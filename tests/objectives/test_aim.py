"""AIM: the prefix-causal mask, prefix sampling, the next-patch loss and the MLP head against
NumPy float64 references written from the paper and the official training code (apple/ml-l3m);
no information leaks from a target patch to its prediction; evaluation attention is
bidirectional; the smoke config end to end with a resume and reconstruction images."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, numpy_gelu, numpy_layer_norm
from PIL import Image

from selfsup import config as config_lib
from selfsup import objectives
from selfsup.backbones import Mask, vit
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.objectives import aim
from selfsup.train import loop
from selfsup.train import step as step_lib

IMG, PATCH, B = 32, 8, 2
N, P = (IMG // PATCH) ** 2, PATCH * PATCH * 3
BACKBONE = dict(
    variant=f"Ti/{PATCH}", width=32, depth=2, num_heads=2, cls_token=False, pool="gap",
    use_bias=False,
)  # fmt: skip
HEAD = dict(head_width=32, head_depth=2)


# ---------------------------------------------------------------- NumPy float64 references


def ref_prefix_mask(n, prefix):
    """AIM's prefix attention: query i sees key j iff j is in the prefix or j <= i."""
    out = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = j < prefix or j <= i
    return out


def ref_norm_pix(t):
    mean = t.mean(-1, keepdims=True)
    var = ((t - mean) ** 2).sum(-1, keepdims=True) / (t.shape[-1] - 1)  # unbiased, as torch.var
    return (t - mean) / np.sqrt(var + 1e-6)


def ref_aim_loss(pred, target, prefix, norm_pix):
    """Mean over (image b, patch j >= prefix_b) of mean_p (pred[b, j-1, p] - target[b, j, p])^2."""
    if norm_pix:
        target = ref_norm_pix(target)
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for j in range(prefix[b], pred.shape[1]):
            total += ((pred[b, j - 1] - target[b, j]) ** 2).mean()
            count += 1
    return total / count


def ref_pos_embed(gh, gw, dim):
    """MAE's 2-D sin-cos: first half encodes the column, second the row; each [sin, cos]."""
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    rows, cols = np.divmod(np.arange(gh * gw), gw)

    def half(pos):
        return np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], 1)

    return np.concatenate([half(cols.astype(float)), half(rows.astype(float))], axis=1)


def ref_ln(x, p, eps=1e-5):
    return numpy_layer_norm(x, p["scale"], p["bias"], eps)


def ref_head(x, p, grid, depth):
    """l3m's SimpleDecoder with identity attention and bias-free MLPs."""
    x = x @ p["proj"]["kernel"] + p["proj"]["bias"]
    x = x + ref_pos_embed(*grid, x.shape[-1])
    for i in range(depth):
        blk = p[f"blocks_{i}"]
        x = x + ref_ln(x, blk["norm1"])  # the attention branch, attention = identity
        h = numpy_gelu(ref_ln(x, blk["norm2"]) @ blk["mlp"]["fc1"]["kernel"])
        x = x + h @ blk["mlp"]["fc2"]["kernel"]
    return ref_ln(x, p["norm"]) @ p["pred"]["kernel"] + p["pred"]["bias"]


def ref_patchify(x, p):
    """[B, H, W, C] -> [B, N, p*p*C], raster order, pixels (row, column, channel)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def ref_unpatchify(patches):
    x = np.asarray(patches).reshape(B, IMG // PATCH, IMG // PATCH, PATCH, PATCH, 3)
    return jnp.asarray(x.transpose(0, 1, 3, 2, 4, 5).reshape(B, IMG, IMG, 3))


# ---------------------------------------------------------------- pure functions


def test_prefix_causal_mask_matches_its_definition():
    assert aim.prefix_causal_mask is vit.prefix_causal_mask  # re-exported, one implementation
    rng = np.random.default_rng(0)
    for n in (5, 16):
        prefix = rng.integers(0, n + 1, 6)
        got = np.asarray(aim.prefix_causal_mask(n, jnp.asarray(prefix)))
        assert got.shape == (6, n, n) and got.dtype == np.bool_
        for b in range(6):
            np.testing.assert_array_equal(got[b], ref_prefix_mask(n, prefix[b]))
        np.testing.assert_array_equal(aim.prefix_causal_mask(n, 3), ref_prefix_mask(n, 3))


def test_prefix_lengths_are_uniform_in_1_to_n_minus_1():
    lengths = np.asarray(aim.sample_prefix_len(jax.random.key(0), 6000, N))
    assert lengths.dtype == np.int32 and lengths.min() == 1 and lengths.max() == N - 1
    counts = np.bincount(lengths, minlength=N)[1:]
    np.testing.assert_allclose(counts / 6000, 1 / (N - 1), atol=0.015)
    with pytest.raises(UserError, match="at least 2 patches"):
        aim.sample_prefix_len(jax.random.key(0), 2, 1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_aim_loss_matches_numpy(norm_pix):
    r = np.random.default_rng(1)
    pred, target = r.normal(size=(3, 10, 12)), 2.0 + 3.0 * r.normal(size=(3, 10, 12))
    prefix = np.array([1, 4, 9])
    got = aim.aim_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(prefix), norm_pix)
    np.testing.assert_allclose(got, ref_aim_loss(pred, target, prefix, norm_pix), rtol=1e-5)
    # The offset matters: pairing pred[j] with target[j] gives another number.
    unshifted = np.concatenate([pred[:, 1:], pred[:, :1]], axis=1)
    assert abs(ref_aim_loss(unshifted, target, prefix, norm_pix) - float(got)) > 1e-2


def test_aim_loss_ignores_predictions_for_prefix_targets():
    r = np.random.default_rng(2)
    pred, target = jnp.asarray(r.normal(size=(2, 8, 12))), jnp.asarray(r.normal(size=(2, 8, 12)))
    prefix = jnp.asarray([4, 4])
    base = aim.aim_loss(pred, target, prefix)
    # Rows 0..2 predict patches 1..3 (inside the prefix); row 7 predicts nothing.
    for row in (0, 1, 2, 7):
        np.testing.assert_allclose(aim.aim_loss(pred.at[:, row].add(9.0), target, prefix), base)
    # Row 3 predicts patch 4, the first one after the prefix.
    assert abs(float(aim.aim_loss(pred.at[:, 3].add(9.0), target, prefix)) - float(base)) > 1.0
    assert aim.aim_loss(pred, target, jnp.asarray([8, 8])) == 0.0  # nothing to predict


# ---------------------------------------------------------------- the objective


def objective(**kw):
    return aim.Objective(vit.Model(**BACKBONE), **{**HEAD, **kw})


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, IMG, IMG, 3))


@pytest.fixture(scope="module")
def params():
    @jax.jit
    def init():
        rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
        leaves, tree = jax.tree.flatten(objective().init(rngs, (images(),), train=False)["params"])
        # Move every parameter off its initial value so LayerNorm scales and biases matter too.
        keys = jax.random.split(jax.random.key(2), len(leaves))
        moved = [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys, strict=True)]
        return tree.unflatten(moved)

    return init()


@jax.jit
def sample_prefix(params, x, seed):
    rngs = {"mask": jax.random.key(seed)}
    m = objective()
    return m.apply({"params": params}, (x,), rngs=rngs, method=lambda o, v: o.sample_prefix(v[0]))


@jax.jit
def predict(params, x, prefix_len):
    m = objective()
    return m.apply({"params": params}, x, prefix_len, False, method=m.predict)


def test_contract_and_build_errors():
    assert aim.Objective.num_views == 1 and "mask" in aim.Objective.rng_streams
    with pytest.raises(UserError, match="head_width"):
        objective(head_width=30)

    class NoPrefix(nn.Module):
        mask_modes = ("drop", "replace")

    with pytest.raises(UserError, match="mask mode 'causal_prefix'"):
        aim.Objective(NoPrefix())
    built = objectives.build({"name": "aim", **HEAD}, {"name": "vit", **BACKBONE})
    assert isinstance(built, aim.Objective) and built.norm_pix_loss


def test_head_matches_numpy(params):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    # l3m: no biases in the head's MLPs; the projection and the output layer keep theirs.
    assert set(p["blocks_0"]["mlp"]["fc1"]) == {"kernel"} == set(p["blocks_1"]["mlp"]["fc2"])
    assert set(p["proj"]) == {"kernel", "bias"} == set(p["pred"])
    tokens = np.random.default_rng(3).normal(size=(B, N, 32))
    head = aim.Head(32, 2, P)
    got = jax.jit(head.apply, static_argnums=2)({"params": params["head"]}, tokens, (4, 4))
    np.testing.assert_allclose(got, ref_head(tokens, p, (4, 4), 2), atol=2e-4)


def test_forward_is_the_trunk_then_the_head_and_the_loss(params):
    x, prefix = images(1), jnp.asarray([3, 11])
    pred = np.asarray(predict(params, x, prefix), np.float64)
    feats = jax.jit(vit.Model(**BACKBONE).apply)(
        {"params": params["backbone"]}, x, mask=Mask(prefix, "causal_prefix")
    )
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["head"])
    want = ref_head(np.asarray(feats.tokens, np.float64), p, (4, 4), 2)
    np.testing.assert_allclose(pred, want, atol=2e-4)

    m = objective()
    rngs = {"mask": jax.random.key(4)}
    loss, metrics = jax.jit(lambda q, v: m.apply({"params": q}, v, train=True, rngs=rngs))(
        params, (x,)
    )
    drawn = np.asarray(sample_prefix(params, x, 4))  # from the "mask" stream
    assert drawn.dtype == np.int32 and np.all((drawn >= 1) & (drawn <= N - 1))
    pred = np.asarray(predict(params, x, drawn), np.float64)
    target = ref_patchify(np.asarray(x, np.float64), PATCH)
    np.testing.assert_allclose(loss, ref_aim_loss(pred, target, drawn, True), rtol=1e-4)
    assert metrics["loss"] == loss and metrics["prefix_len"] == drawn.mean()


def test_no_prediction_sees_its_target(params):
    """Row i (i >= prefix - 1) predicts patch i+1; changing patch k >= prefix must leave every
    row before k unchanged. Changing a prefix patch changes every row."""
    x, prefix = images(2), jnp.asarray([5, 5])
    base = np.asarray(predict(params, x, prefix))
    patches = jnp.asarray(ref_patchify(np.asarray(x), PATCH))
    for k in (5, 9, N - 1):
        moved = ref_unpatchify(patches.at[:, k].add(3.0))
        diff = np.abs(np.asarray(predict(params, moved, prefix)) - base).max(axis=(0, 2))
        assert np.all(diff[:k] < 1e-5), (k, diff)
        assert np.all(diff[k:] > 1e-4), (k, diff)
    moved = ref_unpatchify(patches.at[:, 2].add(3.0))
    assert np.all(np.abs(np.asarray(predict(params, moved, prefix)) - base).max(axis=(0, 2)) > 1e-4)


def test_evaluation_attention_is_bidirectional(params):
    """Probes call the backbone without a mask: the first patch's feature sees the last patch."""
    model = jax.jit(vit.Model(**BACKBONE).apply)
    x = images(3)
    patches = jnp.asarray(ref_patchify(np.asarray(x), PATCH))
    y = ref_unpatchify(patches.at[:, N - 1].add(3.0))
    bp = {"params": params["backbone"]}
    free = np.abs(np.asarray(model(bp, y).tokens - model(bp, x).tokens))[:, 0].max()
    assert free > 1e-4
    causal = Mask(jnp.asarray([1, 1]), "causal_prefix")
    trained = np.abs(
        np.asarray(model(bp, y, mask=causal).tokens - model(bp, x, mask=causal).tokens)
    )
    assert trained[:, 0].max() < 1e-6


def test_reconstruct(params):
    m, x = objective(), images(4)
    rngs = {"mask": jax.random.key(6)}
    out = jax.jit(lambda q, v: m.apply({"params": q}, v, rngs=rngs, method=m.reconstruct))(
        params, (x,)
    )
    assert {k: v.shape for k, v in out.items()} == {
        k: x.shape for k in ("original", "masked", "reconstruction")
    }
    prefix = np.asarray(sample_prefix(params, x, 6))
    pred = np.asarray(predict(params, x, prefix), np.float64)
    target = ref_patchify(np.asarray(x, np.float64), PATCH)
    recon = ref_patchify(np.asarray(out["reconstruction"], np.float64), PATCH)
    masked = ref_patchify(np.asarray(out["masked"], np.float64), PATCH)
    np.testing.assert_array_equal(out["original"], x)
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
    for b in range(B):
        k = prefix[b]
        np.testing.assert_array_equal(recon[b, :k], target[b, :k])
        np.testing.assert_array_equal(masked[b, :k], target[b, :k])
        assert np.all(masked[b, k:] == 0)
        # Patch j >= prefix: the prediction made at j - 1, de-normalised with patch j's stats.
        want = pred[b, k - 1 : -1] * std[b, k:] + mean[b, k:]
        np.testing.assert_allclose(recon[b, k:], want, atol=1e-4)


# ---------------------------------------------------------------- the smoke config end to end


def smoke(**overrides):
    config = config_lib.load(str(REPO / "configs" / "aim_vit_in1k.py:smoke"))
    # One block and two images keep the compiles short; test_train runs the config as it is.
    overrides = {"backbone.depth": 1, "objective.head_depth": 1, "num_images": 2, **overrides}
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
