"""Colour and filter ops for view specs: colour jitter, grayscale, Gaussian blur, solarize.

The ops register themselves in `selfsup.augment.OPS` (use them through `selfsup.augment.build`);
the math is in pure functions on float images [..., H, W, 3] in [0, 1]. Semantics are
torchvision's transforms as the SimCLR (Chen et al. 2020, appendix A), BYOL (Grill et al. 2020,
appendix B) and Barlow Twins pipelines use them, drawn per sample:

- `color_jitter`: RandomApply(ColorJitter(brightness, contrast, saturation, hue), p). The four
  adjustments run in a random order with factors uniform in their ranges; SimCLR's strength s
  gives (0.8s, 0.8s, 0.8s, 0.2s).
- `grayscale`: RandomGrayscale(p), the luma copied to all three channels.
- `blur`: RandomApply(GaussianBlur, p) with sigma ~ U(sigma range) and a kernel of 10% of the
  image height made odd (SimCLR: 23 taps at 224 px, 3 at 32 px), reflect padding.
- `solarize`: RandomSolarize(threshold=0.5, p): pixels >= threshold become 1 - x.

Deviations: the luma weights are ITU-R 601-2's (0.299, 0.587, 0.114), as PIL, on whose images
the PyTorch pipelines run; torchvision's tensor path rounds the red weight to 0.2989. Values stay
float between ops (PIL quantises to uint8 after each and rounds the contrast mean to a level).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from selfsup.augment.registry import Op, register
from selfsup.errors import UserError

LUMA = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids, in torchvision's order


# ---------------------------------------------------------------------------------------------
# Pure functions. `factor` broadcasts against the image: a scalar, or [B, 1, 1, 1] for a batch.


def rgb_to_grayscale(images: jax.Array) -> jax.Array:
    """ITU-R 601-2 luma: [..., 3] -> [..., 1]. A weighted sum, not a matmul, so that TPU's
    default matmul precision does not round it."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[..., None]


def blend(images: jax.Array, other: Any, factor: Any) -> jax.Array:
    """clip(factor * images + (1 - factor) * other, 0, 1): the form of the first three jitters."""
    return jnp.clip(factor * images + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(images: jax.Array, factor: Any) -> jax.Array:
    """Scale towards black: factor 0 gives black, 1 the image."""
    return blend(images, 0.0, factor)


def adjust_contrast(images: jax.Array, factor: Any) -> jax.Array:
    """Blend with the image's mean luma (one value per image [H, W, 3])."""
    mean = jnp.mean(rgb_to_grayscale(images), axis=(-3, -2, -1), keepdims=True)
    return blend(images, mean, factor)


def adjust_saturation(images: jax.Array, factor: Any) -> jax.Array:
    """Blend with the per-pixel luma: factor 0 gives the grayscale image."""
    return blend(images, rgb_to_grayscale(images), factor)


def rgb_to_hsv(images: jax.Array) -> jax.Array:
    """[..., 3] RGB in [0, 1] -> [..., 3] (hue in [0, 1), saturation, value), as `colorsys`."""
    r, g, b = images[..., 0], images[..., 1], images[..., 2]
    v = jnp.max(images, axis=-1)
    c = v - jnp.min(images, axis=-1)
    gray = c == 0  # hue undefined: 0, as colorsys; the safe divisor keeps gradients finite
    safe_c = jnp.where(gray, 1.0, c)
    s = jnp.where(gray, 0.0, c / jnp.where(v == 0, 1.0, v))
    # Sector by the largest channel, red before green before blue on ties (colorsys'
    # precedence, argmax's too). Not by `v == r`: XLA may recompute r inside a fusion with
    # different rounding (an FMA or not), and then no channel equals v.
    sector = jnp.argmax(images, axis=-1)
    h = jnp.where(
        sector == 0,
        (g - b) / safe_c,
        jnp.where(sector == 1, 2.0 + (b - r) / safe_c, 4.0 + (r - g) / safe_c),
    )
    h = jnp.where(gray, 0.0, jnp.mod(h / 6.0, 1.0))
    return jnp.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of `rgb_to_hsv`: channel n in (5, 3, 1) for (R, G, B) is
    v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6."""
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * h, 6.0)
    return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(images: jax.Array, shift: Any) -> jax.Array:
    """Rotate the hue by `shift` turns (torchvision: in [-0.5, 0.5]); saturation and value kept."""
    hsv = rgb_to_hsv(images)
    shift = jnp.asarray(shift, images.dtype)
    hue = jnp.mod(hsv[..., 0] + (shift[..., 0] if shift.ndim else shift), 1.0)
    return hsv_to_rgb(hsv.at[..., 0].set(hue))


def gaussian_kernel(sigma: Any, size: int) -> jax.Array:
    """Normalised 1-D Gaussian [size] at integer offsets -(size // 2) .. size // 2."""
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    return k / jnp.sum(k)


def gaussian_blur(image: jax.Array, sigma: Any, size: int) -> jax.Array:
    """Separable Gaussian blur of one image [H, W, C] with an odd `size`-tap kernel, reflect
    padding (the edge pixel not repeated, as torchvision) -> [H, W, C]."""
    height, width = image.shape[:2]
    half = size // 2
    k = gaussian_kernel(sigma, size)
    padded = jnp.pad(image, ((half, half), (half, half), (0, 0)), mode="reflect")
    # Shift-and-add: `size` slices; cheap for SimCLR's kernels (at most ~23 taps).
    rows = sum(k[i] * padded[i : i + height] for i in range(size))
    return sum(k[i] * rows[:, i : i + width] for i in range(size))


def solarize_images(images: jax.Array, threshold: float = 0.5) -> jax.Array:
    """Invert pixels at or above `threshold`: x -> 1 - x (images in [0, 1])."""
    return jnp.where(images >= threshold, 1.0 - images, images)


# ---------------------------------------------------------------------------------------------
# Colour jitter: parameters drawn per sample, then applied in their order.


class JitterParams(NamedTuple):
    """Per-sample draws of `color_jitter` for a batch of N."""

    apply: jax.Array  # bool [N]: RandomApply's coin
    order: jax.Array  # int32 [N, 4]: a permutation of (BRIGHTNESS, CONTRAST, SATURATION, HUE)
    factors: jax.Array  # float32 [N, 4]: factor of each op, indexed by op id


def jitter_params(
    rng: jax.Array, num: int, ranges: tuple[tuple[float, float], ...], p: float
) -> JitterParams:
    """Draw `num` samples' jitter: apply ~ Bernoulli(p), a uniform random order of the four ops,
    factor of op i ~ U(ranges[i])."""
    k_apply, k_order, k_factor = jax.random.split(rng, 3)
    lo, hi = (jnp.array([r[j] for r in ranges], jnp.float32) for j in (0, 1))
    return JitterParams(
        apply=jax.random.bernoulli(k_apply, p, (num,)),
        # argsort of iid uniforms: a uniform random permutation (cheaper to compile than
        # a vmapped jax.random.permutation).
        order=jnp.argsort(jax.random.uniform(k_order, (num, 4)), axis=1).astype(jnp.int32),
        factors=jax.random.uniform(k_factor, (num, 4), minval=lo, maxval=hi),
    )


def apply_jitter(
    image: jax.Array, order: jax.Array, factors: jax.Array, enabled: tuple[bool, ...]
) -> jax.Array:
    """One image [H, W, 3] through the ops in `order` [4] with `factors` [4]; ops whose
    `enabled[i]` is False are skipped (torchvision's None)."""
    on = jnp.array(enabled)
    hue_at = jnp.argmax(order == HUE)

    def blend_step(x: jax.Array, k: int) -> jax.Array:
        # Brightness, contrast and saturation are one blend whose reference differs by op, so
        # each position costs one blend whatever op lands there (no switch over branches).
        op = order[k]
        gray = rgb_to_grayscale(x)
        ref = jnp.where(op == SATURATION, gray, jnp.where(op == CONTRAST, jnp.mean(gray), 0.0))
        return jnp.where(on[op] & (op != HUE), blend(x, ref, factors[op]), x)

    # Hue (the costly HSV round trip) runs once: the blends before its position, then hue, then
    # the blends after it.
    for k in range(3):
        image = jnp.where(k < hue_at, blend_step(image, k), image)
    if enabled[HUE]:
        image = adjust_hue(image, factors[HUE])
    for k in range(1, 4):
        image = jnp.where(k > hue_at, blend_step(image, k), image)
    return image


# ---------------------------------------------------------------------------------------------
# The ops.


def _probability(p: Any, op: str) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise UserError(f"{op}: p must be a probability in [0, 1], got {p!r}")
    return float(p)


def _jitter_range(value: Any, name: str, center: float, bound: tuple[float, float]):
    """A number v gives (center - v, center + v) (low clipped at 0 for the blends), a pair is
    taken as given; both must lie in `bound`, as torchvision's ColorJitter."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and value >= 0:
        lo, hi = center - value, center + value
        lo = max(lo, 0.0) if center == 1.0 else lo
    elif (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        lo, hi = value
    else:
        raise UserError(f"color_jitter: {name} must be a number >= 0 or (low, high), got {value!r}")
    if not bound[0] <= lo <= hi <= bound[1]:
        raise UserError(
            f"color_jitter: {name} range ({lo}, {hi}) must satisfy {bound[0]} <= low <= high "
            f"<= {bound[1]}"
        )
    return float(lo), float(hi)


@register("color_jitter")
def color_jitter(
    brightness: Any = None,
    contrast: Any = None,
    saturation: Any = None,
    hue: Any = None,
    p: float = 0.8,
    strength: float = 1.0,
) -> Op:
    """ColorJitter applied with probability p, per sample. Unset amounts come from SimCLR's
    strength s: (0.8s, 0.8s, 0.8s, 0.2s); s = 1 for ImageNet, 0.5 for CIFAR. BYOL's setting is
    `color_jitter(0.4, 0.4, 0.2, 0.1)`."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or strength < 0:
        raise UserError(f"color_jitter: strength must be a number >= 0, got {strength!r}")
    amounts = [0.8 * strength if v is None else v for v in (brightness, contrast, saturation)] + [
        0.2 * strength if hue is None else hue
    ]
    names = ("brightness", "contrast", "saturation", "hue")
    ranges = tuple(
        _jitter_range(v, n, 1.0, (0.0, float("inf")))
        for v, n in zip(amounts[:3], names[:3], strict=True)
    ) + (_jitter_range(amounts[3], "hue", 0.0, (-0.5, 0.5)),)
    centers = (1.0, 1.0, 1.0, 0.0)
    enabled = tuple(not (lo == hi == c) for (lo, hi), c in zip(ranges, centers, strict=True))
    p = _probability(p, "color_jitter")

    @jax.jit  # one compiled call when used eagerly; inlined inside the train step's jit
    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        _check_rgb(images, "color_jitter")
        params = jitter_params(rng, images.shape[0], ranges, p)
        apply_one = functools.partial(apply_jitter, enabled=enabled)  # static flags
        out = jax.vmap(apply_one)(images, params.order, params.factors)
        return jnp.where(params.apply[:, None, None, None], out, images)

    return fn


@register("grayscale")
def grayscale(p: float = 0.2) -> Op:
    """RandomGrayscale: with probability p (SimCLR, BYOL: 0.2) all channels become the luma."""
    p = _probability(p, "grayscale")

    @jax.jit
    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        _check_rgb(images, "grayscale")
        apply = jax.random.bernoulli(rng, p, (images.shape[0], 1, 1, 1))
        return jnp.where(apply, jnp.broadcast_to(rgb_to_grayscale(images), images.shape), images)

    return fn


@register("blur", "gaussian_blur")
def blur(p: float = 0.5, sigma: Any = (0.1, 2.0), kernel_size: int | None = None) -> Op:
    """Gaussian blur with probability p (SimCLR 0.5; BYOL 1.0 and 0.1 for its two views), sigma
    ~ U(sigma) per sample; kernel_size None: 10% of the image height made odd."""
    p = _probability(p, "blur")
    if isinstance(sigma, int | float) and not isinstance(sigma, bool):
        sigma = (sigma, sigma)
    ok = (
        isinstance(sigma, tuple)
        and len(sigma) == 2
        and all(isinstance(s, int | float) and not isinstance(s, bool) for s in sigma)
        and 0 < sigma[0] <= sigma[1]
    )
    if not ok:
        raise UserError(f"blur: sigma must be a number > 0 or (low, high), got {sigma!r}")
    if kernel_size is not None and (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, int)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise UserError(
            f"blur: kernel_size must be an odd positive int or None, got {kernel_size!r}"
        )
    lo, hi = float(sigma[0]), float(sigma[1])

    @jax.jit
    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        b, height, width, _ = images.shape
        size = kernel_size or (height // 10) // 2 * 2 + 1
        if size // 2 >= min(height, width):
            raise UserError(
                f"blur: kernel_size {size} is too large for {height}x{width} images (reflect "
                "padding needs kernel_size // 2 < each side); pass a smaller kernel_size"
            )
        k_apply, k_sigma = jax.random.split(rng)
        sigmas = jax.random.uniform(k_sigma, (b,), minval=lo, maxval=hi)
        out = jax.vmap(lambda im, s: gaussian_blur(im, s, size))(images, sigmas)
        apply = jax.random.bernoulli(k_apply, p, (b, 1, 1, 1))
        return jnp.where(apply, out, images)

    return fn


@register("solarize")
def solarize(p: float = 0.2, threshold: float = 0.5) -> Op:
    """RandomSolarize on [0, 1] images: with probability p (BYOL: 0 and 0.2 for its two views),
    pixels >= threshold become 1 - x."""
    p = _probability(p, "solarize")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise UserError(f"solarize: threshold must be a number, got {threshold!r}")

    @jax.jit
    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        apply = jax.random.bernoulli(rng, p, (images.shape[0], 1, 1, 1))
        return jnp.where(apply, solarize_images(images, threshold), images)

    return fn


def _check_rgb(images: jax.Array, op: str) -> None:
    if images.shape[-1] != 3:
        raise UserError(f"{op}: needs RGB images (3 channels), got shape {images.shape}")
