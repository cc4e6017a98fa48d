"""ViT backbone: variants, parameter counts, sin-cos embeddings, masking, and the math of a block
against NumPy float64 references written from the equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_attention, numpy_gelu

from selfsup.backbones import Features, Mask, vit
from selfsup.errors import UserError

IMG = 32
PATCH = 8
N = (IMG // PATCH) ** 2
SMALL = dict(variant=f"Ti/{PATCH}", width=32, depth=2, num_heads=4)


# ---------------------------------------------------------------- NumPy float64 references


def ref_pos_embed(gh, gw, dim):
    """Per token (row r, col c): [sin(c w_k), cos(c w_k), sin(r w_k), cos(r w_k)], k < dim/4,
    w_k = 10000^(-k/(dim/4)); tokens in raster order (MAE's construction)."""
    q = dim // 4
    out = np.zeros((gh * gw, dim))
    for r in range(gh):
        for c in range(gw):
            for k in range(q):
                omega = 1.0 / 10000 ** (k / q)
                out[r * gw + c, k] = math.sin(c * omega)
                out[r * gw + c, q + k] = math.cos(c * omega)
                out[r * gw + c, 2 * q + k] = math.sin(r * omega)
                out[r * gw + c, 3 * q + k] = math.cos(r * omega)
    return out


def ref_layernorm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def ref_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def ref_attention(x, p, heads, allowed=None):
    """softmax(Q K^T / sqrt(d_head)) V per head; qkv features ordered (3, heads, d_head)."""
    b, t, d = x.shape
    dh = d // heads
    qkv = ref_dense(x, p["qkv"]).reshape(b, t, 3, heads, dh)
    out = numpy_attention(qkv, allowed).reshape(b, t, d)
    return ref_dense(out, p["proj"])


def ref_mlp(x, p):
    return ref_dense(numpy_gelu(ref_dense(x, p["fc1"])), p["fc2"])


def ref_block(x, p, heads):
    x = x + ref_attention(ref_layernorm(x, p["norm1"]), p["attn"], heads)
    return x + ref_mlp(ref_layernorm(x, p["norm2"]), p["mlp"])


def ref_vit(images, params, depth, heads, patch, drop_keep=None, replace=None):
    """Tokens [B, N or K, D] after the final norm, and the cls token [B, D]."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    pix = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    pix = pix.reshape(b, gh * gw, patch * patch * c)
    kernel = params["patch_embed"]["kernel"].reshape(-1, params["patch_embed"]["kernel"].shape[-1])
    x = pix @ kernel + params["patch_embed"]["bias"]
    if replace is not None:
        x = np.where(replace[..., None], params["mask_token"], x)
    x = x + ref_pos_embed(gh, gw, x.shape[-1])
    if drop_keep is not None:
        x = np.stack([x[i, drop_keep[i]] for i in range(b)])
    x = np.concatenate([np.broadcast_to(params["cls_token"], (b, 1, x.shape[-1])), x], axis=1)
    for i in range(depth):
        x = ref_block(x, params[f"blocks_{i}"], heads)
    x = ref_layernorm(x, params["norm"])
    return x[:, 1:], x[:, 0]


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---------------------------------------------------------------- helpers
# Eager execution compiles each primitive once per shape, so every model test uses the same
# batch (2), image size, width and kept-token count (4) to share those compilations.

B, K = 2, 4


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, IMG, IMG, 3))


def replace_mask(seed=9):
    return jax.random.bernoulli(jax.random.key(seed), 0.5, (B, N))


@pytest.fixture(scope="module")
def params():
    """Parameters of vit.Model(**SMALL), mask token included; shared by the model variants."""
    return vit.Model(**SMALL).init(
        jax.random.key(1), images(), mask=Mask(replace_mask(), "replace")
    )["params"]


def apply(model, params, x, **kw):
    return model.apply({"params": params}, x, **kw)


def n_params(tree):
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


# ---------------------------------------------------------------- variants and counts


def test_parse_variant():
    assert vit.parse_variant("Ti/16") == (192, 12, 3, 16)
    assert vit.parse_variant("S/16") == (384, 12, 6, 16)
    assert vit.parse_variant("B/16") == (768, 12, 12, 16)
    assert vit.parse_variant("L/16") == (1024, 24, 16, 16)
    assert vit.parse_variant("H/14") == (1280, 32, 16, 14)
    assert vit.parse_variant("Ti/4") == (192, 12, 3, 4)
    for bad in ("X/16", "B16", "B/0", "B/x", "B/"):
        with pytest.raises(UserError):
            vit.Model(variant=bad)


def test_unbound_attributes_and_overrides():
    m = vit.Model(variant="L/14")
    assert (m.patch_size, m.embed_dim) == (14, 1024)
    m = vit.Model(variant="Ti/4", width=64, depth=2, num_heads=4, mlp_dim=100)
    assert (m.patch_size, m.embed_dim) == (4, 64)
    assert m.dims() == (64, 2, 4, 100, 4)
    assert vit.Model.mask_modes == ("drop", "replace", "causal_prefix")


def analytic_count(d, depth, patch, mlp):
    patch_embed = patch * patch * 3 * d + d
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    return patch_embed + d + depth * block + 2 * d  # + cls token + final norm


@pytest.mark.parametrize(
    "variant,timm_total,d",
    [("Ti/16", 5_717_416, 192), ("B/16", 86_567_656, 768)],  # timm vit_*_patch16_224
)
def test_parameter_counts(variant, timm_total, d):
    width, depth, _, patch = vit.parse_variant(variant)
    expected = analytic_count(width, depth, patch, 4 * width)
    # timm's count adds a 1000-class head and a learned [197, D] position embedding.
    assert expected == timm_total - (d * 1000 + 1000) - 197 * d
    m = vit.Model(variant=variant)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert n_params(shapes["params"]) == expected


def test_param_dtype_stays_float32_with_bf16_compute():
    m = vit.Model(**SMALL, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((B, IMG, IMG, 3), jnp.float32)
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    assert jax.eval_shape(m.apply, variables, x).tokens.dtype == jnp.bfloat16


def test_initialisation(params):
    # patch_embed: xavier uniform over the flattened [p*p*C, D] view, not the conv's own fans
    # (those would give a limit of sqrt(6 / (p*p*C + p*p*D)), 3x smaller here).
    k = np.asarray(params["patch_embed"]["kernel"])
    limit = math.sqrt(6.0 / (PATCH * PATCH * 3 + 32))
    assert 0.95 * limit < np.abs(k).max() <= limit
    qkv = np.asarray(params["blocks_0"]["attn"]["qkv"]["kernel"])
    limit = math.sqrt(6.0 / (32 + 3 * 32))
    assert 0.95 * limit < np.abs(qkv).max() <= limit
    assert not np.any(params["blocks_0"]["mlp"]["fc1"]["bias"])
    assert 0.01 < np.std(params["cls_token"]) < 0.04
    assert 0.01 < np.std(params["mask_token"]) < 0.04
    assert np.all(params["norm"]["scale"] == 1.0) and not np.any(params["norm"]["bias"])


# ---------------------------------------------------------------- position embeddings


@pytest.mark.parametrize("gh,gw,dim", [(4, 4, 32), (3, 5, 16), (14, 14, 768)])
def test_sincos_pos_embed(gh, gw, dim):
    got = vit.sincos_pos_embed(gh, gw, dim)
    assert got.shape == (gh * gw, dim)
    np.testing.assert_allclose(got, ref_pos_embed(gh, gw, dim), atol=1e-6)


def test_sincos_needs_width_divisible_by_4():
    with pytest.raises(UserError):
        vit.sincos_pos_embed(2, 2, 30)


# ---------------------------------------------------------------- block math


def test_attention_matches_numpy_with_and_without_mask():
    x = jax.random.normal(jax.random.key(3), (B, N + 1, 32))
    attn = vit.Attention(num_heads=4)
    params = attn.init(jax.random.key(4), x)["params"]
    got = attn.apply({"params": params}, x)
    want = ref_attention(np.asarray(x, np.float64), f64(params), 4)
    np.testing.assert_allclose(got, want, atol=1e-5)

    causal = np.tril(np.ones((N + 1, N + 1), bool))[None, None]  # [1, 1, T, T]
    got = attn.apply({"params": params}, x, jnp.asarray(causal))
    want = ref_attention(np.asarray(x, np.float64), f64(params), 4, causal)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, attn.apply({"params": params}, x), atol=1e-3)


def test_block_mask_argument_reaches_attention():
    x = jax.random.normal(jax.random.key(3), (B, N + 1, 32))
    block = vit.Block(num_heads=4, mlp_dim=128)
    params = block.init(jax.random.key(4), x)["params"]
    causal = jnp.tril(jnp.ones((N + 1, N + 1), bool))[None, None]
    full = block.apply({"params": params}, x)
    masked = block.apply({"params": params}, x, mask=causal)
    np.testing.assert_allclose(full[:, -1], masked[:, -1], atol=1e-5)  # last row sees all
    assert not np.allclose(full[:, 0], masked[:, 0], atol=1e-3)


def test_mlp_uses_exact_erf_gelu():
    x = 3.0 * jax.random.normal(jax.random.key(5), (B, N + 1, 32))
    mlp = vit.Mlp(hidden=128)
    params = mlp.init(jax.random.key(6), x)["params"]
    # Large first-layer outputs make erf and tanh GELU differ well above the tolerance.
    params = jax.tree.map(lambda a: a * 3.0, params)
    got = np.asarray(mlp.apply({"params": params}, x), np.float64)
    xp, pp = np.asarray(x, np.float64), f64(params)
    np.testing.assert_allclose(got, ref_mlp(xp, pp), atol=2e-5, rtol=1e-5)
    h = ref_dense(xp, pp["fc1"])
    tanh = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert np.abs(got - ref_dense(tanh, pp["fc2"])).max() > 1e-3


def test_block_matches_numpy():
    x = jax.random.normal(jax.random.key(7), (B, N + 1, 32))
    block = vit.Block(num_heads=4, mlp_dim=128)
    params = block.init(jax.random.key(8), x)["params"]
    got = block.apply({"params": params}, x)
    np.testing.assert_allclose(got, ref_block(np.asarray(x, np.float64), f64(params), 4), atol=1e-5)


# ---------------------------------------------------------------- full forward and masks


def test_forward_matches_numpy_for_all_mask_modes(params):
    m = vit.Model(**SMALL)
    x = images()
    keep = jnp.asarray([[3, 0, 9, 15], [7, 1, 2, 12]], jnp.int32)
    replace = replace_mask()
    xp, pp = np.asarray(x, np.float64), f64(params)
    for mask, kw in [
        (None, {}),
        (Mask(keep, "drop"), {"drop_keep": np.asarray(keep)}),
        (Mask(replace, "replace"), {"replace": np.asarray(replace)}),
    ]:
        out = apply(m, params, x, mask=mask)
        tokens, cls = ref_vit(xp, pp, 2, 4, PATCH, **kw)
        np.testing.assert_allclose(out.tokens, tokens, atol=1e-4)
        np.testing.assert_allclose(out.cls, cls, atol=1e-4)
        np.testing.assert_allclose(out.pooled, cls, atol=1e-4)


def test_output_shapes(params):
    m = vit.Model(**SMALL)
    x = images()
    keep = jnp.tile(jnp.arange(K, dtype=jnp.int32), (B, 1))
    for mask, t in [(None, N), (Mask(keep, "drop"), K), (Mask(replace_mask(), "replace"), N)]:
        out = apply(m, params, x, mask=mask)
        assert isinstance(out, Features)
        assert out.pooled.shape == (B, 32) and out.cls.shape == (B, 32)
        assert out.tokens.shape == (B, t, 32)
        assert sorted(out.intermediates) == ["block_0", "block_1"]
        assert all(v.shape == (B, t + 1, 32) for v in out.intermediates.values())
    m = vit.Model(**SMALL, cls_token=False, pool="gap")
    out = apply(m, params, x)
    assert out.cls is None and out.tokens.shape == (B, N, 32) and out.pooled.shape == (B, 32)
    assert out.intermediates["block_1"].shape == (B, N, 32)


def test_gap_pool_is_mean_of_tokens(params):
    x = images()
    out = apply(vit.Model(**SMALL, pool="gap"), params, x)
    np.testing.assert_allclose(out.pooled, out.tokens.mean(axis=1), atol=1e-6)
    assert not np.allclose(out.pooled, out.cls, atol=1e-3)


def patch_slice(idx):
    r, c = divmod(idx, IMG // PATCH)
    return (slice(None), slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))


def test_drop_ignores_dropped_pixels_and_uses_kept_ones(params):
    m = vit.Model(**SMALL)
    x = images()
    keep = Mask(jnp.asarray([[5, 2, 14, 8], [5, 2, 14, 8]], jnp.int32), "drop")
    base = apply(m, params, x, mask=keep).tokens
    dropped = x.at[patch_slice(0)].set(7.0).at[patch_slice(11)].set(-3.0)
    np.testing.assert_array_equal(apply(m, params, dropped, mask=keep).tokens, base)
    kept = x.at[patch_slice(2)].add(1.0)
    assert not np.allclose(apply(m, params, kept, mask=keep).tokens, base, atol=1e-3)


def test_replace_ignores_masked_pixels(params):
    m = vit.Model(**SMALL)
    x = images()
    masked = Mask(jnp.zeros((B, N), bool).at[:, jnp.asarray([1, 6, 10])].set(True), "replace")
    base = apply(m, params, x, mask=masked).tokens
    changed = x.at[patch_slice(6)].set(5.0)
    np.testing.assert_array_equal(apply(m, params, changed, mask=masked).tokens, base)
    visible = x.at[patch_slice(7)].set(5.0)
    assert not np.allclose(apply(m, params, visible, mask=masked).tokens, base, atol=1e-3)
    # Without the mask the same pixels do matter.
    assert not np.allclose(apply(m, params, changed).tokens, apply(m, params, x).tokens, atol=1e-3)


def test_drop_path_is_train_only_and_random(params):
    m = vit.Model(**SMALL, drop_path=0.9)
    x = images()
    ref = apply(vit.Model(**SMALL), params, x).tokens
    np.testing.assert_array_equal(apply(m, params, x).tokens, ref)
    a = apply(m, params, x, train=True, rngs={"drop_path": jax.random.key(0)}).tokens
    b = apply(m, params, x, train=True, rngs={"drop_path": jax.random.key(1)}).tokens
    assert not np.allclose(a, ref, atol=1e-3) and not np.allclose(a, b, atol=1e-3)


def test_config_errors(params):
    x = images()
    m = vit.Model(**SMALL)
    with pytest.raises(UserError, match="mask mode 'sparse'"):
        apply(m, params, x, mask=Mask(jnp.zeros((B, 1, 1), bool), "sparse"))
    with pytest.raises(UserError, match="pool"):
        vit.Model(**SMALL, pool="max")
    with pytest.raises(UserError, match="cls_token"):
        vit.Model(**SMALL, cls_token=False)
    with pytest.raises(UserError, match="divisible"):
        vit.Model(variant="Ti/8", width=64)
    with pytest.raises(UserError, match="multiple of the patch"):
        apply(m, params, jnp.zeros((B, 30, 32, 3)))
    with pytest.raises(UserError, match="drop_path"):
        vit.Model(**SMALL, drop_path=1.0)
