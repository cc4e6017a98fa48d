"""Transforms addressed by parameter path: labels from regexes, LR multipliers, layer-wise decay,
and holding parameters frozen for their first steps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfsup import pytree


def path_labels(params: Any, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
    """Pytree like `params` whose leaves are the value of the first rule whose regex fullmatches
    the leaf's '/'-joined path, else `default`."""
    compiled = [(re.compile(regex), value) for regex, value in rules]

    def label(path: tuple, _: Any) -> Any:
        name = pytree.path_str(path)
        for pattern, value in compiled:
            if pattern.fullmatch(name):
                return value
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def scale_by_path(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiply each update by the multiplier of its first matching rule (1 if none)."""

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mults = path_labels(updates, rules, 1.0)
        return jax.tree.map(lambda u, m: u * m, updates, mults), state

    return optax.GradientTransformation(init, update)


def scale_by_layer_decay(decay: float, backbone: Any) -> optax.GradientTransformation:
    """Multiply each update by its layer's decay^(L - layer id), the layers as `backbone`
    declares them; UserError now for a backbone that declares none."""
    # Imported here: finetune imports orbax.
    from selfsup.train.finetune import layer_decay_multipliers, layer_rule

    layer_rule(backbone)

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mults = layer_decay_multipliers(updates, decay, backbone)
        return jax.tree.map(lambda u, m: u * m, updates, mults), state

    return optax.GradientTransformation(init, update)


class HoldState(NamedTuple):
    count: jax.Array  # steps seen
    inner: Any


def hold_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`inner` from step `steps` on; before, zero updates and unchanged float state."""

    def init(params: Any) -> HoldState:
        return HoldState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates: Any, state: HoldState, params: Any = None) -> tuple[Any, HoldState]:
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= steps

        def keep(new: jax.Array, old: jax.Array) -> jax.Array:
            # Integer leaves are step counters (schedules): they advance while held.
            if jnp.issubdtype(new.dtype, jnp.integer):
                return new
            return jnp.where(active, new, old)

        out = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.tree.map(keep, new_inner, state.inner)
        return out, HoldState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init, update)


def zero_inactive(labels: Callable[[Any], Any], held: dict[str, int]):
    """Zero the gradients of frozen parameters and of held ones before their step."""

    def init(params: Any) -> optax.ScaleByScheduleState:
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def zero(label: str, g: jax.Array) -> jax.Array:
            if label == "frozen":
                return jnp.zeros_like(g)
            if label in held:
                return jnp.where(state.count >= held[label], g, jnp.zeros_like(g))
            return g

        out = jax.tree.map(zero, labels(updates), updates)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
