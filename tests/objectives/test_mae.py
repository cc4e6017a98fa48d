"""MAE: patchify, masking and loss against NumPy float64 references written from the paper and
the official code's documented behaviour; the objective's forward against a NumPy forward; and
the training contract (finite loss, gradients everywhere, loss falls on a fixed batch)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import numpy_attention, numpy_gelu, numpy_layer_norm

from selfsup import objectives
from selfsup.backbones import vit
from selfsup.errors import UserError
from selfsup.objectives import mae

IMG, PATCH, B = 32, 8, 2
N = (IMG // PATCH) ** 2
K = N // 4  # kept at mask_ratio 0.75
BACKBONE = dict(variant=f"Ti/{PATCH}", width=32, depth=2, num_heads=4)
DECODER = dict(decoder_width=32, decoder_depth=1, decoder_heads=4)


# ---------------------------------------------------------------- NumPy float64 references


def ref_patchify(x, p):
    """out[b, i*(W/p) + j, (u*p + v)*C + c] = x[b, i*p + u, j*p + v, c]."""
    b, h, w, c = x.shape
    out = np.zeros((b, (h // p) * (w // p), p * p * c))
    for i in range(h // p):
        for j in range(w // p):
            for u in range(p):
                for v in range(p):
                    for ch in range(c):
                        out[:, i * (w // p) + j, (u * p + v) * c + ch] = x[
                            :, i * p + u, j * p + v, ch
                        ]
    return out


def ref_loss(pred, target, mask, norm_pix):
    if norm_pix:
        p = target.shape[-1]
        mean = target.sum(-1, keepdims=True) / p
        var = ((target - mean) ** 2).sum(-1, keepdims=True) / (p - 1)  # unbiased, as torch.var
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def ref_pos_embed(gh, gw, dim):
    """MAE: first half encodes the column, second the row; each half [sin, cos]."""
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    rows, cols = np.divmod(np.arange(gh * gw), gw)

    def half(pos):
        return np.concatenate([np.sin(pos[:, None] * omega), np.cos(pos[:, None] * omega)], 1)

    return np.concatenate([half(cols.astype(float)), half(rows.astype(float))], axis=1)


def ref_ln(x, p):
    return numpy_layer_norm(x, p["scale"], p["bias"], 1e-6)


def ref_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def ref_block(x, p, heads):
    b, t, d = x.shape
    qkv = ref_dense(ref_ln(x, p["norm1"]), p["attn"]["qkv"]).reshape(b, t, 3, heads, d // heads)
    x = x + ref_dense(numpy_attention(qkv).reshape(b, t, d), p["attn"]["proj"])
    h = numpy_gelu(ref_dense(ref_ln(x, p["norm2"]), p["mlp"]["fc1"]))
    return x + ref_dense(h, p["mlp"]["fc2"])


def ref_mae_pred(images, params, ids_keep, ids_restore, heads=4, dec_heads=4):
    """MAE forward (official order): encode kept tokens + cls, decode with mask tokens."""
    enc, p = params["backbone"], PATCH
    b, h, w, _ = images.shape
    x = ref_patchify(images, p) @ enc["patch_embed"]["kernel"].reshape(-1, 32)
    x = x + enc["patch_embed"]["bias"] + ref_pos_embed(h // p, w // p, 32)
    x = np.stack([x[i, ids_keep[i]] for i in range(b)])
    x = np.concatenate([np.broadcast_to(enc["cls_token"], (b, 1, 32)), x], axis=1)
    for i in range(2):
        x = ref_block(x, enc[f"blocks_{i}"], heads)
    x = ref_dense(ref_ln(x, enc["norm"]), params["decoder_embed"])
    n, k = ids_restore.shape[1], ids_keep.shape[1]
    full = np.concatenate([x[:, 1:], np.broadcast_to(params["mask_token"], (b, n - k, 32))], 1)
    full = np.stack([full[i, ids_restore[i]] for i in range(b)])
    x = np.concatenate([x[:, :1], full + ref_pos_embed(h // p, w // p, 32)], axis=1)
    x = ref_block(x, params["decoder_blocks_0"], dec_heads)
    return ref_dense(ref_ln(x, params["decoder_norm"]), params["decoder_pred"])[:, 1:]


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- pure functions


def test_patchify_matches_numpy_and_round_trips():
    x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
    got = mae.patchify(x, 4)
    assert got.shape == (2, 6, 48)
    np.testing.assert_array_equal(got, ref_patchify(np.asarray(x), 4))
    np.testing.assert_array_equal(mae.unpatchify(got, 4, 8, 12), x)


def test_random_masking_matches_argsort_of_noise():
    rng = jax.random.key(3)
    ids_keep, mask, ids_restore = mae.random_masking(rng, 4, 64, 0.75)
    noise = np.asarray(jax.random.uniform(rng, (4, 64)))  # the documented noise
    shuffle = np.argsort(noise, axis=1)
    np.testing.assert_array_equal(ids_keep, shuffle[:, :16])
    np.testing.assert_array_equal(ids_restore, np.argsort(shuffle, axis=1))
    want = np.ones((4, 64))
    np.put_along_axis(want, shuffle[:, :16], 0.0, axis=1)
    np.testing.assert_array_equal(mask, want)
    assert ids_keep.dtype == jnp.int32 and ids_restore.dtype == jnp.int32
    assert mask.dtype == jnp.float32


@pytest.mark.parametrize("n,ratio", [(64, 0.75), (10, 0.6), (49, 0.75), (16, 0.0)])
def test_random_masking_properties(n, ratio):
    keep = int(n * (1 - ratio))
    ids_keep, mask, ids_restore = mae.random_masking(jax.random.key(1), 8, n, ratio)
    ids_keep, mask, ids_restore = map(np.asarray, (ids_keep, mask, ids_restore))
    assert ids_keep.shape == (8, keep) and mask.shape == (8, n) and ids_restore.shape == (8, n)
    assert np.all((mask == 0).sum(1) == keep) and np.all(mask.sum(1) == n - keep)
    for b in range(8):
        assert len(set(ids_keep[b])) == keep and np.all(mask[b, ids_keep[b]] == 0)
        # ids_restore is the inverse of a shuffle whose first `keep` entries are ids_keep.
        shuffle = np.argsort(ids_restore[b])
        np.testing.assert_array_equal(shuffle[:keep], ids_keep[b])
        np.testing.assert_array_equal(shuffle[ids_restore[b]], np.arange(n))
    if 0 < keep < n:
        assert len({tuple(m) for m in mask}) > 1  # samples get different masks


def test_mae_loss_matches_numpy():
    r = np.random.default_rng(0)
    pred, target = r.normal(size=(3, 10, 12)), 2.0 + 3.0 * r.normal(size=(3, 10, 12))
    mask = (r.random((3, 10)) < 0.6).astype(float)
    for norm_pix in (True, False):
        got = mae.mae_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask), norm_pix)
        np.testing.assert_allclose(got, ref_loss(pred, target, mask, norm_pix), rtol=1e-5)
    # With 12 pixels per patch the biased variance would move the loss well past rtol.
    biased = (target - target.mean(-1, keepdims=True)) / np.sqrt(
        target.var(-1, keepdims=True) + 1e-6
    )
    assert abs(ref_loss(pred, biased, mask, False) - ref_loss(pred, target, mask, True)) > 1e-2


def test_mae_loss_ignores_visible_patches():
    r = np.random.default_rng(1)
    pred, target = jnp.asarray(r.normal(size=(2, 8, 12))), jnp.asarray(r.normal(size=(2, 8, 12)))
    mask = jnp.asarray([[1, 0, 1, 0, 0, 1, 1, 0]] * 2, jnp.float32)
    base = mae.mae_loss(pred, target, mask)
    np.testing.assert_allclose(mae.mae_loss(pred.at[:, 1].add(9.0), target, mask), base, rtol=1e-6)
    assert abs(mae.mae_loss(pred.at[:, 2].add(9.0), target, mask) - base) > 1.0
    assert mae.mae_loss(pred, target, jnp.zeros_like(mask)) == 0.0  # mask_ratio 0: no target


# ---------------------------------------------------------------- the objective


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, IMG, IMG, 3))


def objective(**kw):
    return mae.Objective(vit.Model(**BACKBONE), **{**DECODER, **kw})


@pytest.fixture(scope="module")
def params():
    rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}
    return jax.jit(objective().init, static_argnames="train")(rngs, (images(),), train=False)[
        "params"
    ]


def test_contract_attributes():
    assert mae.Objective.num_views == 1 and mae.Objective.mutable == ()
    assert "mask" in mae.Objective.rng_streams


def test_build_time_errors():
    for ratio in (1.0, -0.1):
        with pytest.raises(UserError, match="mask_ratio"):
            objective(mask_ratio=ratio)

    class NoDrop(nn.Module):
        mask_modes = ("replace",)

    with pytest.raises(UserError, match="mask mode 'drop'"):
        mae.Objective(NoDrop())
    with pytest.raises(UserError, match="decoder_heads"):
        objective(decoder_heads=5)
    with pytest.raises(UserError, match="mask_ratio"):
        objectives.build({"name": "mae", "mask_ratio": 1.5}, {"name": "vit", **BACKBONE})
    built = objectives.build({"name": "mae", **DECODER}, {"name": "vit", **BACKBONE})
    assert isinstance(built, mae.Objective) and isinstance(built.backbone, vit.Model)


def test_needs_three_channels(params):
    m = objective()
    with pytest.raises(UserError, match="3-channel"):
        m.apply(
            {"params": params},
            (jnp.zeros((B, IMG, IMG, 1)),),
            train=False,
            rngs={"mask": jax.random.key(0)},
        )


def test_forward_matches_numpy(params):
    x = images()
    rngs = {"mask": jax.random.key(7)}
    for norm_pix in (True, False):
        m = objective(norm_pix_loss=norm_pix)
        ids_keep, mask, ids_restore = m.apply(
            {"params": params}, (x,), rngs=rngs, method=lambda o, v: o.sample_mask(v[0])
        )
        assert ids_keep.shape == (B, K) and float(mask.mean()) == 0.75
        pred = m.apply({"params": params}, x, ids_keep, ids_restore, False, method=m.predict)
        assert pred.shape == (B, N, PATCH * PATCH * 3)  # decoder output, cls dropped
        want = ref_mae_pred(
            np.asarray(x, np.float64), f64(params), *map(np.asarray, (ids_keep, ids_restore))
        )
        np.testing.assert_allclose(pred, want, atol=1e-4)
        loss, metrics = m.apply({"params": params}, (x,), train=True, rngs=rngs)
        target = ref_patchify(np.asarray(x, np.float64), PATCH)
        np.testing.assert_allclose(
            loss, ref_loss(want, target, np.asarray(mask), norm_pix), rtol=1e-4
        )
        assert metrics["loss"] == loss and metrics["mask_ratio_actual"] == 0.75


def test_training_step(params):
    m = objective()
    x = images(3)

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, state):
        def loss_fn(p):
            return m.apply({"params": p}, (x,), train=True, rngs={"mask": jax.random.key(5)})[0]

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss, grads

    p, state, loss, grads = step(params, opt.init(params))
    assert np.isfinite(loss)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)

    first = float(loss)
    for _ in range(15):
        p, state, loss, _ = step(p, state)
    assert float(loss) < 0.8 * first


def test_reconstruct(params):
    m = objective()
    x = images(4)
    rngs = {"mask": jax.random.key(2)}
    out = m.apply({"params": params}, (x,), rngs=rngs, method=m.reconstruct)
    assert {k: v.shape for k, v in out.items()} == {
        k: (B, IMG, IMG, 3) for k in ("original", "masked", "reconstruction")
    }
    np.testing.assert_array_equal(out["original"], x)
    ids_keep, mask, ids_restore = m.apply(
        {"params": params}, (x,), rngs=rngs, method=lambda o, v: o.sample_mask(v[0])
    )
    pred = np.asarray(
        m.apply({"params": params}, x, ids_keep, ids_restore, False, method=m.predict)
    )
    target = ref_patchify(np.asarray(x, np.float64), PATCH)
    removed = np.asarray(mask) > 0
    recon = ref_patchify(np.asarray(out["reconstruction"], np.float64), PATCH)
    masked = ref_patchify(np.asarray(out["masked"], np.float64), PATCH)
    np.testing.assert_array_equal(recon[~removed], target[~removed])  # visible = original
    np.testing.assert_array_equal(masked[~removed], target[~removed])
    assert np.all(masked[removed] == 0)
    # Removed patches: the prediction with each target patch's normalisation undone.
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
    np.testing.assert_allclose(recon[removed], (pred * std + mean)[removed], atol=1e-4)
