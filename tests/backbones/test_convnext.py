"""ConvNeXt backbone: variants against timm, the forward pass and SparK's sparse mode against a
NumPy float64 reference, masking invariance, drop path, and 8 emulated devices against one (the
export: tests/export/test_export_convnext.py)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import numpy_gelu, numpy_layer_norm, rel_err
from convnext_params import IMG, SMALL, B, images, random_params

from selfsup import backbones
from selfsup.backbones import Features, Mask, convnext
from selfsup.errors import UserError

# Two masked cells per image: [[masked, kept], [kept, masked]] and [[kept, masked], [kept, kept]].
MASKED = np.array([[[1, 0], [0, 1]], [[0, 1], [0, 0]]], bool)


# ---------------------------------------------------------------- NumPy float64 reference


def ref_ln(x, p, eps=1e-6):
    return numpy_layer_norm(x, p["scale"], p["bias"], eps)


def ref_patch_conv(x, p, k):
    """Convolution with kernel k and stride k (non-overlapping patches), HWIO kernel."""
    b, h, w, c = x.shape
    x = x[:, : h // k * k, : w // k * k].reshape(b, h // k, k, w // k, k, c)
    return np.einsum("bipjqc,pqco->bijo", x, p["kernel"]) + p["bias"]


def ref_dwconv(x, p):
    """Depthwise 7x7 convolution, zero padding 3: out[y, x] = sum k[dy, dx] in[y+dy-3, x+dx-3]."""
    k = p["kernel"][:, :, 0, :]  # [7, 7, C]
    b, h, w, c = x.shape
    padded = np.zeros((b, h + 6, w + 6, c))
    padded[:, 3 : 3 + h, 3 : 3 + w] = x
    out = np.zeros_like(x)
    for dy in range(7):
        for dx in range(7):
            out += padded[:, dy : dy + h, dx : dx + w] * k[dy, dx]
    return out + p["bias"]


def ref_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def ref_convnext(images, p, depths, masked=None):
    """(feature maps, pooled) of ConvNeXt; under a stride-32 `masked` grid, SparK's rules: every
    conv / norm output and every residual branch is zero at masked positions, pooling averages
    kept positions."""

    def z(x):  # zero the masked positions of a map at any stride
        if masked is None:
            return x
        r = x.shape[1] // masked.shape[1]
        kept = ~np.repeat(np.repeat(masked, r, axis=1), r, axis=2)
        return x * kept[..., None]

    x = z(images)
    x = z(ref_ln(z(ref_patch_conv(x, p["stem_0"], 4)), p["stem_1"]))
    maps = []
    for i, depth in enumerate(depths):
        stage = p[f"stages_{i}"]
        if i > 0:
            x = z(ref_patch_conv(z(ref_ln(x, stage["downsample_0"])), stage["downsample_1"], 2))
        for j in range(depth):
            q = stage[f"blocks_{j}"]
            y = z(ref_ln(z(ref_dwconv(z(x), q["conv_dw"])), q["norm"]))
            y = ref_dense(numpy_gelu(ref_dense(y, q["mlp"]["fc1"])), q["mlp"]["fc2"]) * q["gamma"]
            x = x + z(y)
        maps.append(x)
    if masked is None:
        pooled = x.mean(axis=(1, 2))
    else:
        kept = (~masked)[..., None]
        pooled = (x * kept).sum(axis=(1, 2)) / kept.sum(axis=(1, 2))
    return maps, ref_ln(pooled, p["head_norm"])


# ---------------------------------------------------------------- helpers


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


_JITTED = {}


def forward(model, params, x, mask=None, *, train=False, rngs=None):
    """Jitted model.apply, compiled once per architecture, mask or not, and train flag."""
    key = (model.arch(), model.drop_path, model.layer_scale_init, mask is None, train)
    if key not in _JITTED:

        def apply(params, x, value, rngs):
            m = None if value is None else Mask(value, "sparse")
            return model.apply({"params": params}, x, mask=m, train=train, rngs=rngs)

        _JITTED[key] = jax.jit(apply)
    value = None if mask is None else jnp.asarray(mask)
    return _JITTED[key](params, jnp.asarray(x), value, rngs)


@pytest.fixture(scope="module")
def params():
    return random_params(convnext.Model(**SMALL))


# ---------------------------------------------------------------- variants, counts, init


def timm_convnext(name):
    from torch_compat import timm, torch

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return timm.create_model(name, num_classes=0)


@pytest.mark.parametrize("variant", list(convnext.VARIANTS))
def test_variant_table_matches_timm(variant):
    stages = timm_convnext(f"convnext_{variant}").stages
    depths = tuple(len(s.blocks) for s in stages)
    dims = tuple(s.blocks[0].conv_dw.out_channels for s in stages)
    assert convnext.VARIANTS[variant] == (depths, dims)
    conv_mlp = stages[0].blocks[0].mlp.fc1.weight.ndim == 4  # 1x1 conv rather than Linear
    assert conv_mlp == (variant in convnext.CONV_MLP)


@pytest.mark.parametrize("variant", ["atto", "tiny"])
def test_parameter_count_matches_timm(variant):
    m = convnext.Model(variant=variant)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
    timm_model = timm_convnext(f"convnext_{variant}")
    assert count == sum(p.numel() for p in timm_model.parameters())
    assert m.embed_dim == timm_model.num_features


def test_overrides_and_attributes():
    m = convnext.Model(**SMALL)
    assert m.arch() == ((1, 1, 1, 1), (16, 32, 64, 128))
    assert (m.embed_dim, m.stage_dims) == (128, (16, 32, 64, 128))
    assert convnext.Model(variant="atto", dims=[8, 16, 32, 64]).arch()[1] == (8, 16, 32, 64)
    assert convnext.Model.mask_modes == ("sparse",)


def test_initialisation():
    m = convnext.Model(**SMALL)
    # An "rbg" key: XLA compiles its generator ~2x faster on CPU than threefry's.
    key = jax.random.key(3, impl="rbg")
    p = jax.jit(m.init)(key, jnp.zeros((1, 32, 32, 3)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(p)
    kernels = [np.asarray(a) for path, a in leaves if path[-1].key == "kernel"]
    assert len(kernels) == 1 + 3 + 4 * 3  # stem, 3 downsamplings, 4 blocks x (dw, fc1, fc2)
    for k in kernels:  # each has >= 768 entries: the std is known to ~3% here
        assert 0.018 < k.std() < 0.022 and abs(k.mean()) < 0.003, k.shape
    # normal(0.02) is what the official trunc_normal_(std=.02, a=-2, b=2) draws in practice.
    assert max(np.abs(k).max() for k in kernels) > 3.5 * 0.02
    block = p["stages_2"]["blocks_0"]
    np.testing.assert_array_equal(block["gamma"], np.full(64, 1e-6, np.float32))
    assert not np.any(block["conv_dw"]["bias"]) and not np.any(block["mlp"]["fc1"]["bias"])
    assert np.all(p["head_norm"]["scale"] == 1) and not np.any(p["head_norm"]["bias"])
    # No layer scale at all when disabled (timm's ls_init_value=None).
    m = convnext.Model(**SMALL, layer_scale_init=None)
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert "gamma" not in shapes["stages_0"]["blocks_0"]


def test_param_dtype_stays_float32_with_bf16_compute():
    m = convnext.Model(**SMALL, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((B, IMG, IMG, 3), jnp.float32)
    variables = jax.eval_shape(m.init, jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(variables))
    out = jax.eval_shape(m.apply, variables, x)
    assert out.pooled.dtype == jnp.bfloat16 and out.feature_maps[-1].dtype == jnp.bfloat16


# ---------------------------------------------------------------- forward against NumPy


def test_forward_matches_numpy_dense_and_sparse(params):
    m = convnext.Model(**SMALL)
    x = images()
    for masked in (None, MASKED):
        out = forward(m, params, x, masked)
        maps, pooled = ref_convnext(np.asarray(x, np.float64), f64(params), SMALL["depths"], masked)
        assert isinstance(out, Features) and out.tokens is None
        assert [f.shape for f in out.feature_maps] == [
            (B, IMG // s, IMG // s, c) for s, c in zip((4, 8, 16, 32), SMALL["dims"], strict=True)
        ]
        assert sorted(out.intermediates) == ["stage_1", "stage_2", "stage_3", "stage_4"]
        for i, (got, want) in enumerate(zip(out.feature_maps, maps, strict=True)):
            assert rel_err(got, want) < 1e-5, (masked is None, i)
            np.testing.assert_array_equal(got, out.intermediates[f"stage_{i + 1}"])
        assert rel_err(out.pooled, pooled) < 1e-5
    # The sparse rules change the result (the test above compares two different things).
    assert rel_err(forward(m, params, x, MASKED).pooled, forward(m, params, x).pooled) > 1e-2


def test_mlp_uses_exact_erf_gelu():
    mlp = convnext.Mlp(hidden=128)
    rng = np.random.default_rng(4)
    # Pre-activations of a few units make erf and tanh GELU differ well above the tolerance.
    p = {
        "fc1": {"kernel": rng.normal(0, 0.5, (32, 128)), "bias": rng.normal(0, 0.5, 128)},
        "fc2": {"kernel": rng.normal(0, 0.5, (128, 32)), "bias": rng.normal(0, 0.5, 32)},
    }
    p = jax.tree.map(lambda a: a.astype(np.float32), p)
    x = rng.normal(size=(B, 8, 8, 32)).astype(np.float32)
    got = np.asarray(jax.jit(mlp.apply)({"params": p}, x), np.float64)
    h = ref_dense(x.astype(np.float64), f64(p)["fc1"])
    np.testing.assert_allclose(got, ref_dense(numpy_gelu(h), f64(p)["fc2"]), atol=2e-5, rtol=1e-5)
    tanh = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    assert np.abs(got - ref_dense(tanh, f64(p)["fc2"])).max() > 1e-3


# ---------------------------------------------------------------- sparse mode (SparK)


def cell(i, j):
    return (slice(None), slice(32 * i, 32 * (i + 1)), slice(32 * j, 32 * (j + 1)))


def test_sparse_kept_features_ignore_masked_pixels(params):
    m = convnext.Model(**SMALL)
    x = images()
    changed = x.copy()
    rng = np.random.default_rng(5)
    for b, i, j in zip(*np.nonzero(MASKED), strict=True):  # new content under every masked cell
        changed[b, 32 * i : 32 * (i + 1), 32 * j : 32 * (j + 1)] = 5 * rng.normal(size=(32, 32, 3))
    base, other = forward(m, params, x, MASKED), forward(m, params, changed, MASKED)
    for s, (f0, f1) in enumerate(zip(base.feature_maps, other.feature_maps, strict=True)):
        r = f0.shape[1] // 2
        masked = np.repeat(np.repeat(MASKED, r, axis=1), r, axis=2)
        np.testing.assert_array_equal(f0, f1, err_msg=f"stage {s + 1}")  # kept: unchanged
        assert not np.any(np.asarray(f0)[masked]), f"stage {s + 1}: masked positions not zero"
    np.testing.assert_array_equal(base.pooled, other.pooled)
    # Without the mask the same change reaches the kept positions (the 7x7 convs spread it).
    dense0, dense1 = forward(m, params, x), forward(m, params, changed)
    kept1 = ~np.repeat(np.repeat(MASKED, 8, axis=1), 8, axis=2)
    assert np.abs(np.asarray(dense0.feature_maps[0] - dense1.feature_maps[0])[kept1]).max() > 1e-3
    # And kept pixels do matter under the mask.
    moved = x.copy()
    moved[cell(0, 1)] += 1.0
    assert rel_err(forward(m, params, moved, MASKED).pooled, base.pooled) > 1e-3


def test_sparse_mask_errors(params):
    m = convnext.Model(**SMALL)
    with pytest.raises(UserError, match=r"mask of shape \[2, 2, 2\]"):
        m.apply({"params": params}, images(), mask=Mask(jnp.zeros((B, 4, 4), bool), "sparse"))
    with pytest.raises(UserError, match="multiple of 32"):
        m.apply(
            {"params": params}, images(size=48), mask=Mask(jnp.zeros((B, 1, 1), bool), "sparse")
        )
    with pytest.raises(UserError, match="mask mode 'drop'"):
        m.apply({"params": params}, images(), mask=Mask(jnp.zeros((B, 4), jnp.int32), "drop"))
    with pytest.raises(UserError, match="mask mode 'replace'"):
        backbones.check_mask_mode(m, "replace", "simmim")
    backbones.check_mask_mode(m, "sparse", "spark")


# ---------------------------------------------------------------- drop path and config errors


def test_drop_path_is_train_only_linear_from_zero_and_random(params):
    m = convnext.Model(**SMALL, drop_path=0.9)
    x = images()
    ref = forward(convnext.Model(**SMALL), params, x)
    np.testing.assert_array_equal(forward(m, params, x).pooled, ref.pooled)
    a = forward(m, params, x, train=True, rngs={"drop_path": jax.random.key(0)})
    b = forward(m, params, x, train=True, rngs={"drop_path": jax.random.key(1)})
    # The first block's rate is 0 (rates rise linearly from 0 to drop_path over all blocks)...
    np.testing.assert_array_equal(a.feature_maps[0], ref.feature_maps[0])
    # ...the last one's is 0.9, so two random draws differ from each other and from eval.
    assert rel_err(a.pooled, ref.pooled) > 1e-3 and rel_err(a.pooled, b.pooled) > 1e-3


def test_config_errors():
    with pytest.raises(UserError, match="unknown variant 'huge'"):
        convnext.Model(variant="huge")
    with pytest.raises(UserError, match="depths must be 4 positive integers"):
        convnext.Model(depths=(1, 1, 1))
    with pytest.raises(UserError, match="dims must be 4 positive integers"):
        convnext.Model(dims=(8, 16, 0, 32))
    with pytest.raises(UserError, match="drop_path"):
        convnext.Model(drop_path=1.0)
    with pytest.raises(UserError, match="too small"):
        m = convnext.Model(**SMALL)
        jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(UserError, match="unknown key 'width'"):
        backbones.build("convnext", variant="atto", width=3)


# ---------------------------------------------------------------- 8 devices against one

SHARDED = r"""
import json, sys
sys.path[:0] = ["tests", "tests/backbones"]  # test_convnext imports conftest
import jax, jax.numpy as jnp, numpy as np
from selfsup.parallel import sharding
from selfsup.backbones import Mask, convnext
from test_convnext import SMALL, random_params

model = convnext.Model(**SMALL)
params = random_params(model)
x = np.asarray(jax.random.normal(jax.random.key(0), (8, 64, 64, 3)))
masked = np.asarray(jax.random.bernoulli(jax.random.key(1), 0.5, (8, 2, 2)))

def fn(p, x, masked):
    dense = model.apply({"params": p}, x)
    sparse = model.apply({"params": p}, x, mask=Mask(masked, "sparse"))
    return [*dense.feature_maps, dense.pooled, *sparse.feature_maps, sparse.pooled]

results = {}
for name, shape, devices in [("one", {"data": 1, "fsdp": 1}, jax.devices()[:1]),
                             ("eight", {"data": 2, "fsdp": 4}, jax.devices())]:
    mesh = sharding.make_mesh(shape, devices)
    p_sh = sharding.tree_shardings(params, mesh, [(".*", "fsdp")])
    batch = sharding.batch_sharding(mesh)
    out = jax.jit(fn)(jax.device_put(params, p_sh), jax.device_put(x, batch),
                      jax.device_put(masked, batch))
    specs = [str(s.spec) for s in jax.tree.leaves(p_sh)]
    results[name] = jax.device_get(out), specs
o1, _ = results["one"]
o8, specs = results["eight"]
rel = lambda a, b: float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))
print(json.dumps({
    "out_err": max(rel(a, b) for a, b in zip(o8, o1)),
    "sharded": sum("fsdp" in s for s in specs),
    "masked": int(masked.sum()),
}))
"""

EIGHT_DEVICE_CHECKS = {"convnext_sharded": SHARDED}


def test_eight_devices_match_one(eight_devices):
    out = json.loads(eight_devices("convnext_sharded"))
    assert out["sharded"] > 10 and 0 < out["masked"] < 32, out  # FSDP on, mask non-trivial
    assert out["out_err"] < 1e-5, out
