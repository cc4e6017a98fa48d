"""Geometric ops, as torchvision computes them: random resized crop, resize, centre crop, flip;
and `view_geometry`, a view's output size and normalisation, which the loop's images, the
evaluators' views and the export read from this one function.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The colour and filter ops register themselves in OPS (after everything they import from here).
from selfsup.augment.registry import OPS, Op, build, parse, per_sample, register
from selfsup.errors import UserError

_METHODS = ("bilinear", "bicubic")
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


def _size(size: Any, op: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise UserError(f"{op}: size must be a positive int or (height, width), got {size!r}")
    return size


def _interval(value: Any, name: str, op: str) -> tuple[float, float]:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and 0 < value[0] <= value[1]
    )
    if not ok:
        raise UserError(f"{op}: {name} must be (low, high) with 0 < low <= high, got {value!r}")
    return float(value[0]), float(value[1])


def _method(method: Any, op: str) -> str:
    if method not in _METHODS:
        raise UserError(f"{op}: method must be one of {', '.join(_METHODS)}, got {method!r}")
    return method


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def crop_boxes(
    rng: jax.Array,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    num: int,
) -> jax.Array:
    """`num` RandomResizedCrop boxes in a height x width image -> int32 [num, 4] (top, left, h, w).

    Per box, as torchvision: area fraction ~ U(scale), log(w / h) ~ U(log ratio), w and h rounded;
    the first of 10 candidates that fits is placed uniformly at random; if none fits, the central
    crop of the whole image clamped to the ratio range. Jitted (shape arguments static) because
    op-by-op dispatch of the vmapped sampler is slow when called eagerly.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    fb_h, fb_w = _fallback_box(height, width, ratio)
    fallback = jnp.array([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w], jnp.int32)

    def one(key: jax.Array) -> jax.Array:
        # One draw per sample (cheaper to compile than several): area, log-ratio, placement.
        u = jax.random.uniform(key, (2 * _ATTEMPTS + 2,))
        target = area * (scale[0] + (scale[1] - scale[0]) * u[:_ATTEMPTS])
        aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[_ATTEMPTS : 2 * _ATTEMPTS])
        w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
        h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = jnp.argmax(fits)  # index of the first True (0 when none; masked below)
        h, w = h[first], w[first]
        # Uniform integer offsets in [0, height - h]; the clip guards float rounding at u -> 1.
        top = jnp.minimum(jnp.floor(u[-2] * (height - h + 1)).astype(jnp.int32), height - h)
        left = jnp.minimum(jnp.floor(u[-1] * (width - w + 1)).astype(jnp.int32), width - w)
        box = jnp.stack([top, left, h, w]).astype(jnp.int32)
        return jnp.where(fits.any(), box, fallback)

    return jax.vmap(one)(jax.random.split(rng, num))


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


@functools.partial(jax.jit, static_argnums=(2, 3))
def resample_box(image: jax.Array, box: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
    """Antialiased resize of `box` (top, left, h, w) of image [H, W, C] -> [size[0], size[1], C].

    Same weights as cropping the box and then resizing it with antialiasing (torchvision/PIL):
    the kernel is renormalised over pixels inside the box. `scale_and_translate` normalises over
    the whole image instead, so it runs on the image masked to the box and is divided by the
    same resampling of the mask (separable: rows times columns).
    """
    height, width = image.shape[:2]
    top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
    scale = jnp.stack([size[0] / h, size[1] / w])
    shift = -jnp.stack([top, left]) * scale
    rows = ((jnp.arange(height) >= top) & (jnp.arange(height) < top + h)).astype(jnp.float32)
    cols = ((jnp.arange(width) >= left) & (jnp.arange(width) < left + w)).astype(jnp.float32)
    masked = image * rows[:, None, None] * cols[None, :, None]
    out_shape = (*size, image.shape[2])
    num = jax.image.scale_and_translate(masked, out_shape, (0, 1), scale, shift, method)
    den_r = jax.image.scale_and_translate(rows, size[:1], (0,), scale[:1], shift[:1], method)
    den_c = jax.image.scale_and_translate(cols, size[1:], (0,), scale[1:], shift[1:], method)
    return num / (den_r[:, None, None] * den_c[None, :, None])


@register("random_resized_crop", "rrc")
def random_resized_crop(
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    method: str = "bilinear",
) -> Op:
    """Random crop (area fraction `scale`, aspect w/h `ratio`) resized to `size`; per sample."""
    size = _size(size, "random_resized_crop")
    scale = _interval(scale, "scale", "random_resized_crop")
    ratio = _interval(ratio, "ratio", "random_resized_crop")
    method = _method(method, "random_resized_crop")

    @jax.jit  # one compiled call when used eagerly; inlined inside the train step's jit
    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        b, height, width, _ = images.shape
        boxes = crop_boxes(rng, height, width, scale, ratio, b)
        return jax.vmap(lambda im, box: resample_box(im, box, size, method))(images, boxes)

    return fn


@register("resize")
def resize(size: int | tuple[int, int], method: str = "bilinear") -> Op:
    """Antialiased resize: an int sets the shorter side (aspect kept, long side truncated), as
    torchvision's Resize; (h, w) sets both."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        shorter: int | None = size
    else:
        shorter = None
        size = _size(size, "resize")
    method = _method(method, "resize")

    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        b, height, width, c = images.shape
        if shorter is None:
            out = size
        elif height <= width:
            out = (shorter, int(shorter * width / height))
        else:
            out = (int(shorter * height / width), shorter)
        return jax.image.resize(images, (b, *out, c), method, antialias=True)

    return fn


@register("center_crop")
def center_crop(size: int | tuple[int, int]) -> Op:
    """Central crop to `size`; offsets rounded as torchvision's CenterCrop."""
    h, w = _size(size, "center_crop")

    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        _, height, width, _ = images.shape
        if h > height or w > width:
            raise UserError(
                f"center_crop: crop {h}x{w} is larger than the {height}x{width} image; "
                "resize first or crop smaller"
            )
        top, left = int(round((height - h) / 2)), int(round((width - w) / 2))
        return images[:, top : top + h, left : left + w]

    return fn


@register("flip", "flip_lr")
def flip(p: float = 0.5) -> Op:
    """Horizontal flip of each sample with probability p."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise UserError(f"flip: p must be a probability in [0, 1], got {p!r}")

    def one(image: jax.Array, rng: jax.Array) -> jax.Array:
        return jnp.where(jax.random.bernoulli(rng, p), image[:, ::-1], image)

    return per_sample(one)


class ViewGeometry(NamedTuple):
    """A view's output and its normalisation: view = (pixels in [0, 1] - mean) / std."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]  # per channel; 0 without `normalize`
    std: tuple[float, ...]  # per channel; 1 without `normalize`
    normalize: tuple[str, ...]  # the spec's normalize ops as spec text, in order


@functools.lru_cache(maxsize=64)
def view_geometry(spec: str, image_size: int) -> ViewGeometry:
    """The geometry of view `spec` made from uint8 [B, image_size, image_size, 3] images:
    its [h, w, C] and its composite per-channel normalisation.

    mean and std are computed in float32 from the pixel values 0 and 1 (every normalize op is
    affine per channel) and rounded to 6 significant digits: the constants the spec states.
    """
    (view,) = jax.eval_shape(
        build([spec]),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
        jax.random.key(0),
    )
    _, height, width, channels = view.shape
    ops = [(args, kwargs) for name, args, kwargs in parse(spec) if name == "normalize"]
    probe = np.stack([np.zeros((1, 1, channels)), np.ones((1, 1, channels))]).astype(np.float32)
    for args, kwargs in ops:
        probe = np.asarray(OPS["normalize"](*args, **kwargs)(probe, None))
    zero, one = probe[0, 0, 0].astype(np.float64), probe[1, 0, 0].astype(np.float64)
    std = 1.0 / (one - zero)
    texts = tuple(
        f"normalize({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
        for args, kwargs in ops
    )
    # "+ 0.0" turns "-0.0" into 0.0.
    return ViewGeometry(
        height=height,
        width=width,
        channels=channels,
        mean=tuple(float(f"{v:.6g}") + 0.0 for v in -zero * std),
        std=tuple(float(f"{v:.6g}") + 0.0 for v in std),
        normalize=texts,
    )
