"""On-device view augmentations: small ops composed by spec strings, run inside the jitted step.

A view is a spec such as `"rrc(224, scale=(0.08, 1), method='bicubic')|flip|normalize"`: ops
joined by `|`, each `name` or `name(literal args)`. Every op is a factory
`op(*args, **kwargs) -> fn(images float32 [B, H, W, C], rng) -> images [B, h, w, C]`, registered
in `OPS` by `@register`, so a new op is one decorated function in this file. Ops with per-sample
randomness split their key into B keys and vmap (see `per_sample`).

Geometry follows torchvision: `random_resized_crop` samples boxes as `RandomResizedCrop` does and
resamples them with antialiasing as crop-then-`resize(antialias=True)` does; `resize(int)` sets
the shorter side. Values stay float (no rounding to uint8, no clipping of bicubic overshoot).
The colour and filter ops (`color_jitter`, `grayscale`, `blur`, `solarize`) live in
`augment_color.py` and register here on import.

Views may differ in size: SwAV's multi-crop is several specs (`multi_crop` writes them), and
asymmetric settings (BYOL's blur p 1.0 / 0.1, solarize 0 / 0.2) are simply different specs.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from selfsup.errors import UserError

Op = Callable[[jax.Array, jax.Array], jax.Array]
OPS: dict[str, Callable[..., Op]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_METHODS = ("bilinear", "bicubic")
_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before its central fallback


def register(*names: str) -> Callable[[Callable[..., Op]], Callable[..., Op]]:
    """Decorator: make an op factory available in specs under each of `names`."""

    def deco(factory: Callable[..., Op]) -> Callable[..., Op]:
        for name in names:
            OPS[name] = factory
        return factory

    return deco


def build(view_specs: Sequence[str]) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    """Compile one spec per view into `views_fn(images, rng) -> tuple of views`.

    images: uint8 [B, H, W, 3] (or float in [0, 1]); each view is float32 [B, h_v, w_v, 3].
    View v draws from `fold_in(rng, v)` and its op i from `fold_in(view_rng, i)`. Spec errors
    (unknown op, bad arguments) raise UserError here, at build time.
    """
    if isinstance(view_specs, str) or not view_specs:
        raise UserError(
            f"augment: expected a list of view specs, one per view, got {view_specs!r}; "
            'write e.g. ["rrc(224)|flip|normalize"]'
        )
    views = [_compile(spec) for spec in view_specs]

    def views_fn(images: jax.Array, rng: jax.Array) -> tuple[jax.Array, ...]:
        if images.ndim != 4:
            raise ValueError(f"augment: images must be [B, H, W, C], got shape {images.shape}")
        x = to_float(images)
        out = []
        for v, ops in enumerate(views):
            view_rng = jax.random.fold_in(rng, v)
            y = x
            for i, op in enumerate(ops):
                y = op(y, jax.random.fold_in(view_rng, i))
            out.append(y)
        return tuple(out)

    return views_fn


def multi_crop(
    global_spec: str | Sequence[str],
    local_spec: str | Sequence[str],
    n_global: int = 2,
    n_local: int = 6,
) -> list[str]:
    """SwAV's multi-crop as view specs: `n_global` global views, then `n_local` local ones.

    A spec string is repeated; a sequence gives one spec per view (e.g. BYOL's asymmetric pair)
    and must have `n_global` (or `n_local`) entries. SwAV at 224 px:
    `multi_crop("rrc(224, scale=(0.14, 1))|...", "rrc(96, scale=(0.05, 0.14))|...", 2, 6)`;
    scaled down for 32 px images, 2 x 32 + 6 x 16.
    """
    out = []
    for spec, n, kind in ((global_spec, n_global, "global"), (local_spec, n_local, "local")):
        if isinstance(n, bool) or not isinstance(n, int) or n < (1 if kind == "global" else 0):
            raise UserError(
                f"multi_crop: n_{kind} must be an int >= {int(kind == 'global')}, got {n!r}"
            )
        specs = [spec] * n if isinstance(spec, str) else list(spec)
        if len(specs) != n or not all(isinstance(s, str) for s in specs):
            raise UserError(
                f"multi_crop: {kind}_spec must be a spec string or {n} spec strings, got {spec!r}"
            )
        out += specs
    return out


def to_float(images: jax.Array) -> jax.Array:
    """uint8 [..] in 0..255 -> float32 in [0, 1]; float input is taken as already in [0, 1]."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def _compile(spec: str) -> list[Op]:
    ops = []
    for name, args, kwargs in parse(spec):
        if name not in OPS:
            raise UserError(
                f"augment spec {spec!r}: unknown op '{name}'; known ops: {', '.join(sorted(OPS))}"
            )
        factory = OPS[name]
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as e:
            raise UserError(
                f"augment spec {spec!r}: {e} for op {name}{inspect.signature(factory)}"
            ) from None
        try:
            ops.append(factory(*args, **kwargs))
        except UserError as e:
            raise UserError(f"augment spec {spec!r}: {e}") from None
    return ops


# ---------------------------------------------------------------------------------------------
# Parsing: the spec is a Python expression `op | op | ...` read with `ast`; arguments must be
# literals (numbers, strings, tuples, None/True/False, and + - * / of numbers, so `4/3` works).

_ARITH = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def parse(spec: str) -> list[tuple[str, tuple, dict]]:
    """`"a(1, k=(2, 3))|b"` -> `[("a", (1,), {"k": (2, 3)}), ("b", (), {})]`; nothing is evaluated.

    An empty spec is no ops (the view is the image as float32 in [0, 1]).
    """
    if not isinstance(spec, str):
        raise UserError(f"augment: a view spec must be a string, got {spec!r}")
    text = spec.strip()
    if not text:
        return []
    try:
        # Parenthesised so that a spec may span lines.
        tree = ast.parse(f"({text}\n)", mode="eval").body
    except SyntaxError as e:
        raise UserError(
            f"augment spec {spec!r}: syntax error ({e.msg}); write ops as name(literal args) "
            "joined by '|'"
        ) from None
    ops: list[tuple[str, tuple, dict]] = []

    def walk(node: ast.expr) -> None:
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            walk(node.left)
            walk(node.right)
        else:
            ops.append(_parse_op(node, spec))

    walk(tree)
    return ops


def _parse_op(node: ast.expr, spec: str) -> tuple[str, tuple, dict]:
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        args = tuple(_literal(a, spec) for a in node.args)
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise UserError(f"augment spec {spec!r}: '**' is not allowed in op arguments")
            kwargs[kw.arg] = _literal(kw.value, spec)
        return node.func.id, args, kwargs
    raise UserError(
        f"augment spec {spec!r}: cannot read '{ast.unparse(node)}' as an op; "
        "write name or name(literal args), joined by '|'"
    )


def _literal(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Constant) and node.value is not Ellipsis:
        return node.value
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_literal(e, spec) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _number(_literal(node.operand, spec), node, spec)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        left = _number(_literal(node.left, spec), node, spec)
        right = _number(_literal(node.right, spec), node, spec)
        try:
            return _ARITH[type(node.op)](left, right)
        except ZeroDivisionError:
            raise UserError(
                f"augment spec {spec!r}: division by zero in '{ast.unparse(node)}'"
            ) from None
    raise UserError(
        f"augment spec {spec!r}: argument '{ast.unparse(node)}' is not a literal; "
        "use numbers, quoted strings, tuples, None, True or False"
    )


def _number(value: Any, node: ast.expr, spec: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(
            f"augment spec {spec!r}: arithmetic on a non-number in '{ast.unparse(node)}'"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Argument checks shared by the ops (they raise at build time, with the op's name).


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


def per_sample(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Op:
    """Lift `fn(image [H, W, C], rng)` to a batch op: one key per sample (split), then vmap."""

    def batch_fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        return jax.vmap(fn)(images, jax.random.split(rng, images.shape[0]))

    return batch_fn


# ---------------------------------------------------------------------------------------------
# Geometry.


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


@register("normalize")
def normalize(mean: Any = "imagenet", std: Any = None) -> Op:
    """(x - mean) / std per channel. mean "imagenet" uses ImageNet's mean and std; "none" (or
    "identity") keeps [0, 1] inputs; otherwise mean and std are numbers or per-channel tuples."""
    if isinstance(mean, str):
        if std is not None or mean not in ("imagenet", "none", "identity"):
            raise UserError(
                f"normalize: use 'imagenet', 'none', or numeric mean and std; got mean={mean!r}, "
                f"std={std!r}"
            )
        if mean != "imagenet":
            return lambda images, rng: images
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    mean_a, std_a = _channels(mean, "mean"), _channels(std, "std")
    if any(s <= 0 for s in std_a):
        raise UserError(f"normalize: std must be positive, got {std!r}")

    def fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        channels = images.shape[-1]
        if {len(mean_a), len(std_a)} - {1, channels}:
            raise UserError(
                f"normalize: mean and std need 1 or {channels} values, got {mean!r} and {std!r}"
            )
        return (images - jnp.asarray(mean_a, jnp.float32)) / jnp.asarray(std_a, jnp.float32)

    return fn


def _channels(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (float(value),)
    if (
        isinstance(value, tuple)
        and value
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        return tuple(float(v) for v in value)
    raise UserError(f"normalize: {name} must be a number or a tuple of numbers, got {value!r}")


# The colour and filter ops register themselves in OPS (after everything they import from here).
from selfsup import augment_color  # noqa: E402, F401
