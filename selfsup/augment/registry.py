"""View specs -> `views_fn`: the op registry (`register`), the spec parser and `build`."""

from __future__ import annotations

import ast
import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

# The colour and filter ops register themselves in OPS (after everything they import from here).
from selfsup.errors import UserError

Op = Callable[[jax.Array, jax.Array], jax.Array]
OPS: dict[str, Callable[..., Op]] = {}


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


def per_sample(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Op:
    """Lift `fn(image [H, W, C], rng)` to a batch op: one key per sample (split), then vmap."""

    def batch_fn(images: jax.Array, rng: jax.Array) -> jax.Array:
        return jax.vmap(fn)(images, jax.random.split(rng, images.shape[0]))

    return batch_fn
