"""ViT options for AIM (El-Nouby et al. 2024): prefix-causal attention and bias-free linear layers,
against their definitions and a NumPy float64 forward pass written from the equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_attention, numpy_gelu, numpy_layer_norm

from selfsup.backbones import Mask, check_mask_mode, vit

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2  # 16 patch tokens
AIM = dict(variant=f"Ti/{PATCH}", width=32, depth=2, num_heads=4, cls_token=False, pool="gap")


def ref_prefix_causal(n, prefix):
    """The definition, case by case: a query inside the prefix sees exactly the prefix; a query
    past it sees every key up to itself."""
    out = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = j < prefix if i < prefix else j <= i
    return out


def ref_forward(images, p, heads, prefix):
    """Bias-free (linear layers) ViT without cls token, prefix-causal attention; float64."""
    b, h, w, c = images.shape
    g = h // PATCH
    pix = images.reshape(b, g, PATCH, g, PATCH, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, N, -1)
    x = pix @ p["patch_embed"]["kernel"].reshape(-1, 32) + p["patch_embed"]["bias"]
    x = x + vit.sincos_pos_embed(g, g, 32).astype(np.float64)

    def ln(x, q):
        return numpy_layer_norm(x, q["scale"], q["bias"], 1e-6)

    allowed = np.stack([ref_prefix_causal(N, k) for k in prefix])[:, None]  # [B, 1, N, N]
    dh = 32 // heads
    for i in range(2):
        q = p[f"blocks_{i}"]
        y = ln(x, q["norm1"]) @ q["attn"]["qkv"]["kernel"]
        att = numpy_attention(y.reshape(b, N, 3, heads, dh), allowed).reshape(b, N, 32)
        x = x + att @ q["attn"]["proj"]["kernel"]
        hid = numpy_gelu(ln(x, q["norm2"]) @ q["mlp"]["fc1"]["kernel"])
        x = x + hid @ q["mlp"]["fc2"]["kernel"]
    return ln(x, p["norm"])


@pytest.fixture(scope="module")
def model_and_params():
    model = vit.Model(**AIM, use_bias=False)

    @jax.jit
    def init():
        params = model.init(jax.random.key(0), jnp.zeros((2, IMG, IMG, 3)))["params"]
        # Move norms and biases off their init values, so a misplaced one shows.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        noisy = [a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(tree, noisy)

    return model, init()


def images(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, IMG, IMG, 3))


def patch(idx):
    r, c = divmod(idx, IMG // PATCH)
    return (slice(None), slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH))


@functools.cache
def _jitted_apply(model):
    # Eager op-by-op execution compiles every primitive; one jitted forward per model is faster.
    return jax.jit(lambda params, x, mask: model.apply({"params": params}, x, mask=mask))


def forward(model, params, x, prefix=None):
    mask = None if prefix is None else Mask(jnp.asarray(prefix, jnp.int32), "causal_prefix")
    return _jitted_apply(model)(params, x, mask)


def tokens(model, params, x, prefix=None):
    return np.asarray(forward(model, params, x, prefix).tokens)


def test_prefix_causal_mask_matches_definition():
    rng = np.random.default_rng(0)
    for n in (1, 5, 16):
        for prefix in sorted({0, 1, n, n + 3, *rng.integers(0, n + 1, size=4).tolist()}):
            np.testing.assert_array_equal(
                vit.prefix_causal_mask(n, prefix), ref_prefix_causal(n, prefix)
            )
    prefixes = rng.integers(0, 17, size=6)
    batched = vit.prefix_causal_mask(16, jnp.asarray(prefixes))
    assert batched.shape == (6, 16, 16) and batched.dtype == jnp.bool_
    np.testing.assert_array_equal(batched, np.stack([ref_prefix_causal(16, k) for k in prefixes]))
    # prefix 0 is plain causal attention; a full prefix is full attention.
    np.testing.assert_array_equal(vit.prefix_causal_mask(7, 0), np.tril(np.ones((7, 7), bool)))
    assert np.all(vit.prefix_causal_mask(7, 7))


def test_causal_prefix_forward_matches_numpy(model_and_params):
    model, params = model_and_params
    x = images()
    prefix = [3, 11]
    want = ref_forward(np.asarray(x, np.float64), jax.tree.map(np.float64, params), 4, prefix)
    np.testing.assert_allclose(tokens(model, params, x, prefix), want, atol=1e-4)


def test_later_tokens_outside_the_prefix_do_not_reach_earlier_ones(model_and_params):
    model, params = model_and_params
    x = images()
    prefix = [3, 3]
    base = tokens(model, params, x, prefix)
    changed = tokens(model, params, x.at[patch(9)].add(2.0), prefix)
    np.testing.assert_allclose(changed[:, :9], base[:, :9], atol=1e-6)
    assert np.abs(changed[:, 9:] - base[:, 9:]).max() > 1e-2
    # Without a mask attention is full: the same change reaches every position.
    full, full_changed = tokens(model, params, x), tokens(model, params, x.at[patch(9)].add(2.0))
    assert np.abs(full_changed[:, 0] - full[:, 0]).max() > 1e-2


def test_prefix_is_bidirectional_and_per_sample(model_and_params):
    model, params = model_and_params
    x = images(1)
    # Patch 9 is inside sample 1's prefix (12) but past sample 0's (3).
    prefix = [3, 12]
    base = tokens(model, params, x, prefix)
    changed = tokens(model, params, x.at[patch(9)].add(2.0), prefix)
    np.testing.assert_allclose(changed[0, :9], base[0, :9], atol=1e-6)
    assert np.abs(changed[1, 0] - base[1, 0]).max() > 1e-2  # an earlier prefix token sees it
    # A prefix token never sees tokens past the prefix.
    changed = tokens(model, params, x.at[patch(14)].add(2.0), prefix)
    np.testing.assert_allclose(changed[1, :12], base[1, :12], atol=1e-6)


def test_cls_token_is_part_of_the_prefix(model_and_params):
    _, params = model_and_params
    model = vit.Model(**{**AIM, "cls_token": True, "pool": "cls"}, use_bias=False)
    params = {**params, "cls_token": jax.random.normal(jax.random.key(2), (1, 1, 32))}
    x = images()
    base = forward(model, params, x, [2, 2])
    # The cls token sees prefix patch 1 ...
    changed = forward(model, params, x.at[patch(1)].add(2.0), [2, 2])
    assert np.abs(changed.cls - base.cls).max() > 1e-2
    # ... and not patch 5, past the prefix.
    changed = forward(model, params, x.at[patch(5)].add(2.0), [2, 2])
    np.testing.assert_allclose(changed.cls, base.cls, atol=1e-6)


def test_use_bias_false_creates_no_linear_biases():
    x = jnp.zeros((2, IMG, IMG, 3))
    shapes = jax.eval_shape(vit.Model(**AIM, use_bias=False).init, jax.random.key(0), x)["params"]
    paths = {
        jax.tree_util.keystr(p, simple=True, separator="/")
        for p, _ in jax.tree_util.tree_leaves_with_path(shapes)
    }
    for layer in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
        assert f"blocks_0/{layer}/kernel" in paths and f"blocks_0/{layer}/bias" not in paths
    # As in apple/ml-aim: the LayerNorms and the patch embedding keep their biases.
    for kept in ("blocks_1/norm1/bias", "blocks_1/norm2/bias", "norm/bias", "patch_embed/bias"):
        assert kept in paths
    biased = jax.eval_shape(vit.Model(**AIM).init, jax.random.key(0), x)["params"]
    count = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))
    d, m = 32, 128
    assert count(biased) - count(shapes) == 2 * (3 * d + d + m + d)


def test_causal_prefix_is_a_declared_mask_mode():
    assert "causal_prefix" in vit.Model.mask_modes
    check_mask_mode(vit.Model(**AIM), "causal_prefix", "aim")  # no error
