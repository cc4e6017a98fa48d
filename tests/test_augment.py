"""Augmentation ops against NumPy float64 references of torchvision's documented behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup import augment
from selfsup.errors import UserError

B, H, W = 4, 24, 32  # one image shape for most tests keeps the eager compiles few


def _images(seed=0, shape=(B, H, W, 3)):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# --- NumPy reference: antialiased crop-then-resize (torchvision antialias=True / PIL) ----------


def _kernel(x, method):
    x = np.abs(x)
    if method == "bilinear":
        return np.maximum(0.0, 1.0 - x)
    a = -0.5  # Keys cubic as in PIL and torchvision's antialiased bicubic
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _aa_weights(n_in, n_out, method):
    """[n_out, n_in]: kernel stretched by the downscale factor, normalised per output pixel."""
    s = n_in / n_out
    stretch = max(s, 1.0)
    centers = (np.arange(n_out) + 0.5) * s
    k = _kernel((np.arange(n_in)[None, :] + 0.5 - centers[:, None]) / stretch, method)
    return k / k.sum(1, keepdims=True)


def _np_crop_resize(image, box, size, method="bilinear"):
    top, left, h, w = (int(v) for v in box)
    crop = np.asarray(image, np.float64)[top : top + h, left : left + w]
    wy, wx = _aa_weights(h, size[0], method), _aa_weights(w, size[1], method)
    return np.einsum("oh,hwc,pw->opc", wy, crop, wx)


# --- parsing ----------------------------------------------------------------------------------


def test_parse_tricky_specs():
    spec = "rrc(224, scale=(0.08, 1), method='bicubic')|flip(0.5)|normalize('imagenet')"
    assert augment.parse(spec) == [
        ("rrc", (224,), {"scale": (0.08, 1), "method": "bicubic"}),
        ("flip", (0.5,), {}),
        ("normalize", ("imagenet",), {}),
    ]
    # '|' and brackets inside strings, whitespace and newlines, bare names.
    assert augment.parse("  op('a|b(', k=\"x)|y\") |\n flip ") == [
        ("op", ("a|b(",), {"k": "x)|y"}),
        ("flip", (), {}),
    ]
    # Arithmetic on numbers, signs, lists become tuples, None/True/False, nested tuples.
    (op,) = augment.parse(
        "rrc(32, ratio=(3/4, 4/3), x=[-1, +2.5, 2*3 - 1], y=None, z=((1,), True))"
    )
    assert op[2]["ratio"] == (0.75, 4 / 3)
    assert op[2]["x"] == (-1, 2.5, 5)
    assert op[2]["y"] is None and op[2]["z"] == ((1,), True)
    assert augment.parse("") == [] and augment.parse("   ") == []


@pytest.mark.parametrize(
    "spec",
    [
        "rrc(size)",  # a name, not a literal
        "__import__('os').system('true')",  # attribute call: never evaluated
        "flip(p=().__class__)",
        "rrc(**{'size': 3})",
        "flip + 1",
        "rrc(32",
        "flip('a' * 3)",
        "rrc(1/0)",
        "lambda: 0",
    ],
)
def test_parse_rejects_non_literals(spec):
    with pytest.raises(UserError, match="augment spec"):
        augment.parse(spec)


def test_unknown_op_lists_known_ops():
    with pytest.raises(UserError, match="unknown op 'flop'") as e:
        augment.build(["rrc(32)|flop"])
    for name in ("flip", "normalize", "random_resized_crop", "rrc", "resize", "center_crop"):
        assert name in str(e.value)


@pytest.mark.parametrize(
    "spec",
    [
        "flip(2)",
        "flip(0.5, 0.3)",
        "rrc()",
        "rrc(32, bogus=1)",
        "rrc(0)",
        "rrc((32, 32, 3))",
        "rrc(32, scale=(1, 0.5))",
        "rrc(32, ratio=(0, 1))",
        "rrc(32, method='nearest')",
        "resize(-3)",
        "center_crop('big')",
        "normalize((0.5, 0.5, 0.5))",  # std missing
        "normalize((0.5,), (0,))",
        "normalize('cifar')",
    ],
)
def test_bad_arguments_raise_user_error(spec):
    with pytest.raises(UserError, match="augment spec"):
        augment.build([spec])


def test_build_wants_a_list_of_specs():
    with pytest.raises(UserError, match="list of view specs"):
        augment.build("rrc(32)|flip")
    with pytest.raises(UserError, match="list of view specs"):
        augment.build([])


# --- ops against NumPy ------------------------------------------------------------------------


def test_views_are_float_in_unit_range_from_uint8():
    x = np.random.default_rng(1).integers(0, 256, (B, H, W, 3), dtype=np.uint8)
    (view,) = augment.build([""])(jnp.asarray(x), jax.random.key(0))
    assert view.dtype == jnp.float32
    np.testing.assert_allclose(view, x / 255.0, rtol=1e-6, atol=1e-7)


def test_flip_against_numpy():
    x = _images()
    key = jax.random.key(3)
    np.testing.assert_array_equal(augment.flip(1.0)(jnp.asarray(x), key), x[:, :, ::-1])
    np.testing.assert_array_equal(augment.flip(0.0)(jnp.asarray(x), key), x)
    # p=0.5: each sample is either flipped or not, and a batch of 32 shows both.
    x = _images(shape=(32, 4, 5, 3))
    out = np.asarray(augment.flip(0.5)(jnp.asarray(x), key))
    flipped = [bool(np.array_equal(o, xi[:, ::-1])) for o, xi in zip(out, x, strict=True)]
    kept = [bool(np.array_equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32


@pytest.mark.parametrize(
    "spec, mean, std",
    [
        ("normalize", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("normalize('imagenet')", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("normalize((0.1, 0.2, 0.3), (0.5, 0.25, 2))", (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)),
        ("normalize(0.5, 0.5)", (0.5,), (0.5,)),
        ("normalize('none')", (0.0,), (1.0,)),
    ],
)
def test_normalize_against_numpy(spec, mean, std):
    x = _images()
    (view,) = augment.build([spec])(jnp.asarray(x), jax.random.key(0))
    want = (x.astype(np.float64) - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(view, want, rtol=1e-6, atol=1e-6)


def test_normalize_channel_mismatch():
    with pytest.raises(UserError, match="1 or 3 values"):
        augment.normalize((0.1, 0.2), (1.0, 1.0))(jnp.asarray(_images()), jax.random.key(0))


def test_center_crop_against_numpy():
    x = _images(shape=(2, 31, 32, 3))
    out = augment.center_crop(16)(jnp.asarray(x), jax.random.key(0))
    top, left = round((31 - 16) / 2), round((32 - 16) / 2)  # torchvision: round((H - h) / 2)
    np.testing.assert_array_equal(out, x[:, top : top + 16, left : left + 16])
    with pytest.raises(UserError, match="larger than"):
        augment.center_crop(40)(jnp.asarray(x), jax.random.key(0))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_against_numpy(method):
    x = _images()  # 24 x 32: shorter side 24
    out = augment.resize(12, method)(jnp.asarray(x), jax.random.key(0))
    assert out.shape == (B, 12, 16, 3)
    up = augment.resize((30, 20), method)(jnp.asarray(x), jax.random.key(0))
    for b in range(B):
        np.testing.assert_allclose(
            out[b], _np_crop_resize(x[b], (0, 0, H, W), (12, 16), method), atol=2e-5
        )
        np.testing.assert_allclose(
            up[b], _np_crop_resize(x[b], (0, 0, H, W), (30, 20), method), atol=2e-5
        )


# --- random resized crop ----------------------------------------------------------------------


@pytest.mark.parametrize("size, method", [(16, "bilinear"), (40, "bicubic")])
def test_rrc_full_scale_equals_resize(size, method):
    x = _images(shape=(2, 32, 32, 3))
    out = augment.random_resized_crop(size, (1, 1), (1, 1), method)(
        jnp.asarray(x), jax.random.key(5)
    )
    plain = jax.image.resize(jnp.asarray(x), (2, size, size, 3), method, antialias=True)
    np.testing.assert_allclose(out, plain, atol=2e-5)
    for b in range(2):
        np.testing.assert_allclose(
            out[b], _np_crop_resize(x[b], (0, 0, 32, 32), (size, size), method), atol=2e-5
        )


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resample_box_integer_aligned_is_exact_crop(method):
    x = _images()[0]
    box = jnp.array([3, 5, 10, 12], jnp.int32)
    out = augment.resample_box(jnp.asarray(x), box, (10, 12), method)
    np.testing.assert_allclose(out, x[3:13, 5:17], atol=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_rrc_content_matches_numpy_crop_then_resize(method):
    x = _images()
    key = jax.random.key(11)
    out = augment.random_resized_crop((12, 20), method=method)(jnp.asarray(x), key)
    boxes = np.asarray(augment.crop_boxes(key, H, W, (0.08, 1.0), (3 / 4, 4 / 3), B))
    assert out.shape == (B, 12, 20, 3)
    for b in range(B):
        want = _np_crop_resize(x[b], boxes[b], (12, 20), method)
        np.testing.assert_allclose(out[b], want, atol=2e-5)


def _np_fallback(height, width, ratio):
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return ((height - h) // 2, (width - w) // 2, h, w)


@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
        (20, 60, (0.08, 1.0), (3 / 4, 4 / 3)),
        (60, 20, (0.2, 1.0), (0.5, 2.0)),
        (32, 32, (0.9, 1.0), (3.0, 4.0)),  # never fits: always the clamped central fallback
    ],
)
def test_crop_boxes_inside_image_and_in_range(height, width, scale, ratio):
    boxes = np.asarray(augment.crop_boxes(jax.random.key(2), height, width, scale, ratio, 2000))
    assert boxes.dtype == np.int32 and boxes.shape == (2000, 4)
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    fallback = (boxes == np.array(_np_fallback(height, width, ratio))).all(1)
    # h and w are rounded, so a box is in range if some unrounded (h', w') within 0.5 of it is.
    area = height * width
    in_scale = ((h - 0.5) * (w - 0.5) <= scale[1] * area) & (
        (h + 0.5) * (w + 0.5) >= scale[0] * area
    )
    in_ratio = ((w - 0.5) / (h + 0.5) <= ratio[1]) & ((w + 0.5) / (h - 0.5) >= ratio[0])
    assert (fallback | (in_scale & in_ratio)).all()
    # Fallback rate and mean box area agree with a NumPy simulation of torchvision's sampler.
    ref_rate, ref_area = _np_sampler_stats(height, width, scale, ratio)
    assert abs(fallback.mean() - ref_rate) < 0.03
    assert abs((h * w).mean() / area - ref_area) < 0.03
    if ref_rate < 0.5:
        # Placement is uniform over the free range, so many offsets occur.
        assert len(np.unique(top)) > 5 and len(np.unique(left)) > 5


def _np_sampler_stats(height, width, scale, ratio, n=20000):
    """(fallback rate, mean area fraction) of RandomResizedCrop's sampler, simulated in NumPy."""
    rng = np.random.default_rng(0)
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), (n, 10)))
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)
    _, _, fb_h, fb_w = _np_fallback(height, width, ratio)
    rows = np.arange(n)
    box_area = np.where(fits.any(1), h[rows, first] * w[rows, first], fb_h * fb_w)
    return 1 - fits.any(1).mean(), box_area.mean() / area


def test_per_sample_crops_differ_within_a_batch():
    x = np.repeat(_images()[:1], 8, axis=0)  # eight copies of one image
    out = np.asarray(augment.random_resized_crop(16)(jnp.asarray(x), jax.random.key(0)))
    distinct = {out[i].tobytes() for i in range(8)}
    assert len(distinct) == 8


# --- composition, jit, determinism ------------------------------------------------------------

SPECS = [
    "rrc(16, scale=(0.2, 1.0))|flip|normalize",
    "rrc((12, 20), scale=(0.08, 1), method='bicubic')|flip(0.5)|normalize('imagenet')",
    "resize(20)|center_crop(16)|normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))",
    "flip(1.0)",
    "",
]


@pytest.mark.parametrize("spec", SPECS[1:])  # SPECS[0] is jitted below; every op is covered
def test_eager_equals_jit(spec):
    x = jnp.asarray(np.random.default_rng(4).integers(0, 256, (B, H, W, 3), dtype=np.uint8))
    fn = augment.build([spec])
    eager = fn(x, jax.random.key(7))
    jitted = jax.jit(fn)(x, jax.random.key(7))
    np.testing.assert_allclose(eager[0], jitted[0], atol=1e-4)


def test_views_shapes_determinism_and_independence():
    x = jnp.asarray(np.random.default_rng(4).integers(0, 256, (B, H, W, 3), dtype=np.uint8))
    fn = jax.jit(augment.build([SPECS[0], SPECS[0], "rrc(8)"]))
    a = fn(x, jax.random.key(1))
    assert [v.shape for v in a] == [(B, 16, 16, 3), (B, 16, 16, 3), (B, 8, 8, 3)]
    assert all(v.dtype == jnp.float32 for v in a)
    b = fn(x, jax.random.key(1))
    c = fn(x, jax.random.key(2))
    for va, vb in zip(a, b, strict=True):
        np.testing.assert_array_equal(va, vb)
    for va, vc in zip(a, c, strict=True):
        assert not np.allclose(va, vc)
    assert not np.allclose(a[0], a[1])  # same spec, different view rng
    # View v uses fold_in(rng, v): the first view alone reproduces view 0.
    (alone,) = jax.jit(augment.build([SPECS[0]]))(x, jax.random.key(1))
    np.testing.assert_array_equal(alone, a[0])


def test_rrc_box_mean_area_matches_torchvision_sampling():
    # Whole-batch statistic of the sampler: with scale=(0.5, 0.5) and ratio=(1, 1) every box is
    # the rounded square of area fraction 0.5, placed anywhere.
    boxes = np.asarray(augment.crop_boxes(jax.random.key(9), 32, 32, (0.5, 0.5), (1, 1), 100))
    side = int(round(math.sqrt(0.5 * 32 * 32)))
    assert (boxes[:, 2] == side).all() and (boxes[:, 3] == side).all()
