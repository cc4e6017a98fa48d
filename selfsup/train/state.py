"""The training state: a pytree created directly in its sharded layout from abstract shapes."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

from selfsup import objectives
from selfsup.parallel import sharding


@struct.dataclass
class TrainState:
    """step: int32 scalar; params: the objective's parameters ("backbone" is the encoder);
    opt_state: optax state; model_state: the objective's mutable collections (e.g. batch_stats)."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any

    def to_dict(self) -> dict:
        """A plain nested dict for checkpoints (optax NamedTuples become dicts)."""
        return flax.serialization.to_state_dict(self)

    def from_dict(self, tree: dict) -> TrainState:
        """Fill this state's structure with the values of a dict made by `to_dict`."""
        return flax.serialization.from_state_dict(self, tree)


def init_fn(model, tx: optax.GradientTransformation, example_views: tuple, seed: int):
    """A function of no arguments that initialises the whole state (for eval_shape and jit)."""

    def init() -> TrainState:
        rng = jax.random.key(seed)
        declared = objectives.contract(model)
        streams = ("params", *declared.rng_streams)
        rngs = {name: jax.random.fold_in(rng, i) for i, name in enumerate(streams)}
        labels = {"labels": jnp.zeros(example_views[0].shape[:1], jnp.int32)}
        variables = model.init(
            rngs, example_views, train=False, **(labels if declared.needs_labels else {})
        )
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            model_state=dict(variables),
        )

    return init


def abstract(model, tx, example_views: tuple, seed: int, mesh, rules) -> tuple[TrainState, Any]:
    """(state, shardings) without computing anything: the state's ShapeDtypeStructs carrying
    the shardings that `rules` give them on `mesh` (a restore's target, a lowering's input)."""
    shapes = jax.eval_shape(init_fn(model, tx, example_views, seed))
    shardings = sharding.tree_shardings(shapes, mesh, rules)
    state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return state, shardings


def create(model, tx, example_views: tuple, seed: int, mesh, rules) -> tuple[TrainState, Any]:
    """(state, shardings): the state initialised under jit straight into its sharded layout."""
    _, shardings = abstract(model, tx, example_views, seed, mesh, rules)
    state = jax.jit(init_fn(model, tx, example_views, seed), out_shardings=shardings)()
    return state, shardings
