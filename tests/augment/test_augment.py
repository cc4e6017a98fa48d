"""Augmentation ops against NumPy float64 references of torchvision's documented behaviour."""

import colorsys
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup import augment
from selfsup.augment import color, geometry, normalization
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
    np.testing.assert_array_equal(geometry.flip(1.0)(jnp.asarray(x), key), x[:, :, ::-1])
    np.testing.assert_array_equal(geometry.flip(0.0)(jnp.asarray(x), key), x)
    # p=0.5: each sample is either flipped or not, and a batch of 32 shows both.
    x = _images(shape=(32, 4, 5, 3))
    out = np.asarray(geometry.flip(0.5)(jnp.asarray(x), key))
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
        normalization.normalize((0.1, 0.2), (1.0, 1.0))(jnp.asarray(_images()), jax.random.key(0))


def test_center_crop_against_numpy():
    x = _images(shape=(2, 31, 32, 3))
    out = geometry.center_crop(16)(jnp.asarray(x), jax.random.key(0))
    top, left = round((31 - 16) / 2), round((32 - 16) / 2)  # torchvision: round((H - h) / 2)
    np.testing.assert_array_equal(out, x[:, top : top + 16, left : left + 16])
    with pytest.raises(UserError, match="larger than"):
        geometry.center_crop(40)(jnp.asarray(x), jax.random.key(0))


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_resize_against_numpy(method):
    x = _images()  # 24 x 32: shorter side 24
    out = geometry.resize(12, method)(jnp.asarray(x), jax.random.key(0))
    assert out.shape == (B, 12, 16, 3)
    up = geometry.resize((30, 20), method)(jnp.asarray(x), jax.random.key(0))
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
    out = geometry.random_resized_crop(size, (1, 1), (1, 1), method)(
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
    out = geometry.resample_box(jnp.asarray(x), box, (10, 12), method)
    np.testing.assert_allclose(out, x[3:13, 5:17], atol=1e-6)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_rrc_content_matches_numpy_crop_then_resize(method):
    x = _images()
    key = jax.random.key(11)
    out = geometry.random_resized_crop((12, 20), method=method)(jnp.asarray(x), key)
    boxes = np.asarray(geometry.crop_boxes(key, H, W, (0.08, 1.0), (3 / 4, 4 / 3), B))
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
    boxes = np.asarray(geometry.crop_boxes(jax.random.key(2), height, width, scale, ratio, 2000))
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
    out = np.asarray(geometry.random_resized_crop(16)(jnp.asarray(x), jax.random.key(0)))
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
    boxes = np.asarray(geometry.crop_boxes(jax.random.key(9), 32, 32, (0.5, 0.5), (1, 1), 100))
    side = int(round(math.sqrt(0.5 * 32 * 32)))
    assert (boxes[:, 2] == side).all() and (boxes[:, 3] == side).all()


# --- colour and filter ops (augment.color) -----------------------------------------------------
# NumPy float64 references written from torchvision's documented formulas: blend(a, b, f) =
# clip(f a + (1 - f) b, 0, 1) with b = 0 (brightness), the image's mean luma (contrast) or the
# per-pixel luma (saturation); hue through `colorsys`; blur as a separable convolution with
# reflect padding.

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, written out independently of the code


def _np_gray(x):
    return np.asarray(x, np.float64) @ LUMA


def _np_blend(x, ref, f):
    return np.clip(f * np.asarray(x, np.float64) + (1 - f) * ref, 0.0, 1.0)


def _np_brightness(x, f):
    return _np_blend(x, 0.0, f)


def _np_contrast(x, f):
    return _np_blend(x, _np_gray(x).mean(), f)


def _np_saturation(x, f):
    return _np_blend(x, _np_gray(x)[..., None], f)


def _np_hue(x, shift):
    flat = np.asarray(x, np.float64).reshape(-1, 3)
    out = np.empty_like(flat)
    for i, (r, g, b) in enumerate(flat):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        out[i] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out.reshape(np.shape(x))


_NP_JITTER = (_np_brightness, _np_contrast, _np_saturation, _np_hue)


def _np_blur(image, sigma, size):
    half = size // 2
    k = np.exp(-0.5 * ((np.arange(size) - half) / sigma) ** 2)
    k /= k.sum()
    padded = np.pad(np.asarray(image, np.float64), ((half, half), (half, half), (0, 0)), "reflect")
    h, w = image.shape[:2]
    rows = sum(k[i] * padded[i : i + h] for i in range(size))
    return sum(k[i] * rows[:, i : i + w] for i in range(size))


def _eager_and_jit(op, x, key):
    """Run an op eagerly and inside an outer jit; they must agree. Returns the eager result."""
    eager = np.asarray(op(jnp.asarray(x), key))
    jitted = np.asarray(jax.jit(op)(jnp.asarray(x), key))
    np.testing.assert_allclose(eager, jitted, atol=1e-6)
    return eager


def _tricky_pixels():
    """Gray pixels, channel ties, primaries, black and white beside random colours: [2, 8, 8, 3]."""
    x = _images(seed=5, shape=(2, 8, 8, 3))
    special = [
        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.3, 0.3, 0.3), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0), (0.7, 0.7, 0.2), (0.2, 0.7, 0.7), (0.7, 0.2, 0.7), (0.5, 0.25, 0.0),
    ]  # fmt: skip
    x[0].reshape(-1, 3)[: len(special)] = special  # a view: writes into x
    return x


def test_rgb_to_hsv_and_back_against_colorsys():
    x = _tricky_pixels()
    hsv = np.asarray(color.rgb_to_hsv(jnp.asarray(x)))
    want = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3).astype(np.float64)])
    np.testing.assert_allclose(hsv.reshape(-1, 3), want, atol=2e-6)
    back = color.hsv_to_rgb(jnp.asarray(want.reshape(x.shape), jnp.float32))
    np.testing.assert_allclose(back, x, atol=2e-6)


@pytest.mark.parametrize("shift", [0.0, 0.1, -0.1, 0.37, -0.5, 0.5])
def test_adjust_hue_against_colorsys(shift):
    x = _tricky_pixels()
    np.testing.assert_allclose(
        color.adjust_hue(jnp.asarray(x), shift), _np_hue(x, shift), atol=3e-6
    )


@pytest.mark.parametrize("factor", [0.0, 0.35, 1.0, 1.8])
def test_brightness_contrast_saturation_against_numpy(factor):
    x = _images()
    for fn, ref in [
        (color.adjust_brightness, _np_brightness),
        (color.adjust_contrast, _np_contrast),
        (color.adjust_saturation, _np_saturation),
    ]:
        got = jax.vmap(lambda im, fn=fn: fn(im, factor))(jnp.asarray(x))  # one image at a time
        for b in range(B):
            np.testing.assert_allclose(got[b], ref(x[b], factor), atol=2e-6, err_msg=fn.__name__)
    if factor == 1.8:  # the clip to [0, 1] really acts here
        assert (_np_brightness(x, factor) == 1.0).any()


def test_grayscale_weights_against_numpy():
    x = _images()
    key = jax.random.key(0)
    gray = np.repeat(_np_gray(x)[..., None], 3, axis=-1)
    np.testing.assert_allclose(_eager_and_jit(color.grayscale(1.0), x, key), gray, atol=1e-6)
    np.testing.assert_array_equal(_eager_and_jit(color.grayscale(0.0), x, key), x)
    # p=0.3 per sample: each output is the image or its grayscale; the rate is near p.
    x = _images(shape=(400, 2, 2, 3))
    out = _eager_and_jit(color.grayscale(0.3), x, jax.random.key(1))
    gray = np.repeat(_np_gray(x)[..., None], 3, axis=-1)
    is_gray = np.array([np.allclose(o, g, atol=1e-6) for o, g in zip(out, gray, strict=True)])
    is_same = np.array([np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert (is_gray ^ is_same).all()
    assert abs(is_gray.mean() - 0.3) < 0.08


def test_solarize_against_numpy():
    x = _images()
    x[0, 0, :4, 0] = [0.5, 0.4999, 0.5001, 0.8]  # 0.8 at threshold 0.8 is inverted (>=)
    key = jax.random.key(0)
    want = np.where(x >= 0.5, 1.0 - x, x)
    np.testing.assert_allclose(_eager_and_jit(color.solarize(1.0), x, key), want, atol=1e-7)
    np.testing.assert_array_equal(_eager_and_jit(color.solarize(0.0), x, key), x)
    out = _eager_and_jit(color.solarize(1.0, threshold=0.8), x, key)
    np.testing.assert_allclose(out, np.where(x >= 0.8, 1.0 - x, x), atol=1e-7)
    x = _images(shape=(400, 2, 2, 3))
    out = _eager_and_jit(color.solarize(0.2), x, jax.random.key(3))
    solarized = np.isclose(out, np.where(x >= 0.5, 1 - x, x)).all(axis=(1, 2, 3))
    same = (out == x).all(axis=(1, 2, 3))
    assert (solarized ^ same).all() and abs(solarized.mean() - 0.2) < 0.07


def _jitter_reference(x, params, enabled):
    """NumPy ColorJitter: per sample, the ops in the drawn order with the drawn factors."""
    out = np.asarray(x, np.float64).copy()
    apply, order, factors = (np.asarray(a) for a in params)
    for b in range(len(out)):
        if not apply[b]:
            continue
        for op in order[b]:
            if enabled[op]:
                out[b] = _NP_JITTER[op](out[b], float(factors[b, op]))
    return out


@pytest.mark.parametrize(
    "kwargs, ranges, enabled",
    [
        # SimCLR's strength s: (0.8s, 0.8s, 0.8s, 0.2s); torchvision turns a number v into
        # (max(0, 1 - v), 1 + v) and hue h into (-h, h).
        ({"strength": 0.5}, ((0.6, 1.4),) * 3 + ((-0.1, 0.1),), (True,) * 4),
        # 0 switches an op off (torchvision's None); pairs are taken as given.
        (
            {"brightness": 0, "contrast": 0.9, "saturation": (0.2, 0.3), "hue": 0},
            ((1, 1), (0.1, 1.9), (0.2, 0.3), (0, 0)),
            (False, True, True, False),
        ),
    ],
)
def test_color_jitter_against_numpy(kwargs, ranges, enabled):
    x = _images(seed=2, shape=(12, 6, 7, 3))
    key = jax.random.key(4)
    op = color.color_jitter(**kwargs, p=0.75)
    if enabled[0]:
        out = _eager_and_jit(op, x, key)
    else:
        out = np.asarray(op(jnp.asarray(x), key))
    params = color.jitter_params(key, 12, ranges, 0.75)
    assert 0 < np.asarray(params.apply).sum() < 12  # both branches of RandomApply are exercised
    np.testing.assert_allclose(out, _jitter_reference(x, params, enabled), atol=5e-6)


def test_jitter_params_order_and_factor_distribution():
    ranges = ((0.6, 1.4), (0.2, 1.8), (0.5, 0.5), (-0.1, 0.1))
    params = color.jitter_params(jax.random.key(0), 4800, ranges, 0.8)
    order = np.asarray(params.order)
    assert all(sorted(o) == [0, 1, 2, 3] for o in order[:200])
    counts = np.unique(order @ np.array([1, 4, 16, 64]), return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 120 and counts.max() < 280  # ~200 each
    factors = np.asarray(params.factors)
    for i, (lo, hi) in enumerate(ranges):
        assert (factors[:, i] >= lo).all() and (factors[:, i] <= hi).all()
        assert abs(factors[:, i].mean() - (lo + hi) / 2) < 0.02 + 1e-6
    assert abs(np.asarray(params.apply).mean() - 0.8) < 0.03


def test_blur_against_numpy_and_sigma_range():
    # An impulse reveals each sample's kernel: sigma = sqrt(-0.5 / log(k[1] / k[0])). The same
    # key on real images then draws the same sigmas, checked against NumPy's convolution.
    n, size, side = 16, 5, 40  # 10% of 40 px: 4 -> odd: 5 taps
    impulse = np.zeros((n, side, side, 3), np.float32)
    impulse[:, 20, 20] = 1.0
    key = jax.random.key(6)
    op = color.blur(1.0, sigma=(0.5, 2.0))
    response = _eager_and_jit(op, impulse, key)[:, 20, 18:23, 0]  # the middle row, 5 taps
    assert (response[:, 0] > 0).all() and (np.asarray(op(impulse, key))[:, 20, 17] == 0).all()
    k1d = response / response.sum(1, keepdims=True)
    sigmas = np.sqrt(-0.5 / np.log(k1d[:, 1] / k1d[:, 2]))
    assert (sigmas > 0.5 - 1e-3).all() and (sigmas < 2.0 + 1e-3).all() and sigmas.std() > 0.2
    x = _images(seed=7, shape=(n, side, side, 3))
    out = _eager_and_jit(op, x, key)
    for b in range(n):
        np.testing.assert_allclose(out[b], _np_blur(x[b], sigmas[b], size), atol=1e-5)


@pytest.mark.parametrize("height, taps", [(224, 23), (96, 9), (32, 3), (16, 1)])
def test_blur_kernel_is_a_tenth_of_the_height_made_odd(height, taps):
    impulse = np.zeros((1, height, 24, 1), np.float32)
    impulse[0, height // 2, 12] = 1.0
    out = np.asarray(color.blur(1.0, sigma=10.0)(jnp.asarray(impulse), jax.random.key(0)))
    assert (out[0, :, 12, 0] > 0).sum() == taps


def test_blur_fixed_kernel_reflect_padding_and_probability():
    x = _images()
    out = _eager_and_jit(color.blur(1.0, sigma=1.5, kernel_size=7), x, jax.random.key(0))
    for b in range(B):  # reflect padding: the borders match NumPy's 'reflect' too
        np.testing.assert_allclose(out[b], _np_blur(x[b], 1.5, 7), atol=1e-5)
    np.testing.assert_array_equal(color.blur(0.0)(jnp.asarray(x), jax.random.key(0)), x)
    x = _images(shape=(200, 4, 4, 3))
    out = np.asarray(color.blur(0.1, 1.0, 3)(jnp.asarray(x), jax.random.key(2)))
    same = (out == x).all(axis=(1, 2, 3))
    want = np.stack([_np_blur(xi, 1.0, 3) for xi in x])
    blurred = np.isclose(out, want, atol=1e-5).all(axis=(1, 2, 3))
    assert (same ^ blurred).all() and abs(blurred.mean() - 0.1) < 0.06


def test_color_ops_match_torchvision_functional():
    tc = pytest.importorskip("torch_compat")
    torch, tf = tc.torch, tc.torchvision.transforms.functional
    x = _tricky_pixels()[0]
    t = torch.tensor(x).permute(2, 0, 1)  # [3, H, W]
    got = color.adjust_hue(jnp.asarray(x), 0.23)
    np.testing.assert_allclose(got, tf.adjust_hue(t, 0.23).permute(1, 2, 0).numpy(), atol=1e-5)
    got = color.gaussian_blur(jnp.asarray(x), 1.3, 5)
    want = tf.gaussian_blur(t, [5, 5], [1.3, 1.3]).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # torchvision's tensor luma rounds red to 0.2989 (ours: 0.299): agreement to ~1e-4.
    got = color.adjust_saturation(jnp.asarray(x), 0.3)
    want = tf.adjust_saturation(t, 0.3).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        "color_jitter(-0.1)",
        "color_jitter(hue=0.6)",
        "color_jitter(brightness=(1.5, 0.5))",
        "color_jitter(contrast=(-0.1, 1.0))",
        "color_jitter(p=1.5)",
        "color_jitter(strength=-1)",
        "color_jitter(saturation='x')",
        "grayscale(-0.1)",
        "blur(sigma=0)",
        "blur(sigma=(2, 1))",
        "blur(kernel_size=4)",
        "solarize(1.5)",
        "solarize(0.2, threshold='half')",
    ],
)
def test_color_ops_bad_arguments(spec):
    with pytest.raises(UserError, match="augment spec"):
        augment.build([spec])


def test_color_ops_bad_shapes():
    x = jnp.asarray(_images(shape=(2, 8, 8, 1)))
    with pytest.raises(UserError, match="3 channels"):
        color.color_jitter()(x, jax.random.key(0))
    with pytest.raises(UserError, match="kernel_size 17 is too large"):
        color.blur(1.0, kernel_size=17)(x, jax.random.key(0))


# --- multi-crop and asymmetric views ----------------------------------------------------------


def test_multi_crop_swav_views_under_jit():
    colour = "flip|grayscale|solarize|normalize"  # (colour jitter: tested above; slow to compile)
    specs = augment.multi_crop(
        f"rrc(32, scale=(0.14, 1))|{colour}", f"rrc(16, scale=(0.05, 0.14))|{colour}", 2, 6
    )
    assert len(specs) == 8 and specs[0] == specs[1] and specs[2] == specs[7] != specs[0]
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, 32, 32, 3), dtype=np.uint8))
    views = jax.jit(augment.build(specs))(x, jax.random.key(3))
    assert [v.shape for v in views] == [(B, 32, 32, 3)] * 2 + [(B, 16, 16, 3)] * 6
    flat = [np.asarray(v).reshape(B, -1) for v in views]
    for i in range(8):  # every view draws its own crops and colours
        for j in range(i + 1, 8):
            if flat[i].shape == flat[j].shape:
                assert not np.allclose(flat[i], flat[j])


def test_multi_crop_per_view_specs_and_errors():
    byol = ("blur(1.0)|solarize(0.0)", "blur(0.1)|solarize(0.2)")
    assert augment.multi_crop(byol, "rrc(8)", 2, 1) == [*byol, "rrc(8)"]
    assert augment.multi_crop("a", "b", 1, 0) == ["a"]
    for args in [("a", "b", 0, 2), ("a", "b", 2, -1), (("a",), "b", 2, 1), ("a", "b", 2.0, 1)]:
        with pytest.raises(UserError, match="multi_crop"):
            augment.multi_crop(*args)


def test_asymmetric_views_follow_their_own_specs():
    # BYOL-style per-view settings: view 0 never solarizes, view 1 always does.
    x = _images()
    v0, v1 = jax.jit(augment.build(["solarize(0.0)", "solarize(1.0)"]))(
        jnp.asarray(x), jax.random.key(0)
    )
    np.testing.assert_array_equal(v0, x)
    np.testing.assert_allclose(v1, np.where(x >= 0.5, 1 - x, x), atol=1e-7)


@pytest.mark.parametrize(
    "spec, size, expect",
    [
        (
            "rrc(24)|flip|normalize('imagenet')",
            32,
            (24, 24, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ("normalize('imagenet')",)),
        ),
        (
            "resize(37)|center_crop(32)|normalize((0.5,), (0.25,))",
            32,
            (32, 32, 3, (0.5,) * 3, (0.25,) * 3, ("normalize((0.5,), (0.25,))",)),
        ),
        # Two normalize ops compose: ((x - 0.5) / 0.25 - 1) / 2 = (x - 0.75) / 0.5.
        (
            "resize(48)|normalize(0.5, 0.25)|normalize(mean=1.0, std=2.0)",
            40,
            (
                48,
                48,
                3,
                (0.75,) * 3,
                (0.5,) * 3,
                ("normalize(0.5, 0.25)", "normalize(mean=1.0, std=2.0)"),
            ),
        ),
        ("rrc(24)", 40, (24, 24, 3, (0.0,) * 3, (1.0,) * 3, ())),
    ],
)
def test_view_geometry_gives_size_and_normalisation(spec, size, expect):
    assert tuple(augment.view_geometry(spec, size)) == expect
