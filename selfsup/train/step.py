"""The jitted train step, built from the config alone: `build_program(config, mesh, ...)`.

Augment, forward, backward and update in one XLA program. Randomness is a function of
(seed, step) and each named stream (`stream_keys`), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from selfsup import augment, objectives, optim
from selfsup.errors import UserError
from selfsup.ops import global_norm
from selfsup.parallel import sharding
from selfsup.train import state as state_lib
from selfsup.train import teacher as teacher_lib


def stream_keys(seed: int, step: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """One key per named stream for this step: fold_in(fold_in(key(seed), step), crc32(name)),
    so a stream's keys depend on its name alone, not on which other streams exist."""
    rng = jax.random.fold_in(jax.random.key(seed), step)
    return {name: jax.random.fold_in(rng, zlib.crc32(name.encode())) for name in names}


def build_model(config: mlc.ConfigDict, num_classes: int | None = None):
    """The objective (with its backbone) in the config's compute dtype; an objective with a
    `num_classes` field left unset gets the dataset's `num_classes`, one that `needs_teacher`
    gets the teacher read from the checkpoint in `config.objective.teacher`."""
    objective, backbone = dict(config.objective), dict(config.backbone)
    if config.compute_dtype == "bfloat16":
        objective.setdefault("dtype", jnp.bfloat16)
        backbone.setdefault("dtype", jnp.bfloat16)
    objective = teacher_lib.with_teacher(objective, objective.get("dtype", jnp.float32))
    return objectives.build(objective, backbone, num_classes=num_classes)


def make_grad_fn(model, views_fn, seed: int):
    """grad_fn(state, batch) -> (loss, metrics, grads, model_updates) for one global batch."""

    declared = objectives.contract(model)

    def grad_fn(state: state_lib.TrainState, batch: dict):
        keys = stream_keys(seed, state.step, ("augment", *declared.rng_streams))
        views = views_fn(batch["image"], keys.pop("augment"))
        labels = {"labels": batch["label"]} if declared.needs_labels else {}
        mutable = declared.mutable

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            (loss, metrics), updates = model.apply(
                variables, views, train=True, rngs=keys, mutable=mutable, **labels
            )
            return loss, (metrics, updates)

        (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, metrics, grads, updates

    return grad_fn


def make_train_step(model, tx, views_fn, seed: int, schedule):
    """train_step(state, batch) -> (state, metrics): augment, forward, backward, update."""
    grad_fn = make_grad_fn(model, views_fn, seed)

    def train_step(state: state_lib.TrainState, batch: dict) -> tuple[state_lib.TrainState, dict]:
        loss, metrics, grads, model_updates = grad_fn(state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state={**state.model_state, **model_updates},
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": global_norm(grads),
            "lr": schedule(state.step),
        }
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step


def compiler_options(mesh) -> dict:
    """XLA options for the train step. On CPU, copy insertion by region analysis: by default
    XLA:CPU copies every donated parameter before the step reads it (124 copies in the MAE
    ViT-B/16 step), as it cannot prove the last read comes before the update writes in place;
    without them the MAE and SimCLR steps are 2-4% faster (BENCHMARKS.md, *Parameter
    copies*)."""
    if any(device.platform != "cpu" for device in mesh.devices.flat):
        return {}
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def jit_train_step(model, tx, views_fn, seed: int, schedule, mesh, state_shardings):
    """`make_train_step` under jax.jit as the loop runs it: the state donated, its shardings
    kept, the metrics replicated."""
    return jax.jit(
        make_train_step(model, tx, views_fn, seed, schedule),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(mesh),
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """What the loop runs, built from the config alone: the objective (with its backbone), the
    optimizer and its schedule, the views function, example views [2, ...] for initialisation,
    the state's abstract shapes and shardings, and the jitted, sharded train step."""

    model: Any
    tx: optax.GradientTransformation
    schedule: Any
    views_fn: Any
    example_views: tuple
    abstract_state: Any
    state_shardings: Any
    train_step: Any
    total_steps: int


def build_program(config, mesh, num_classes: int | None, steps_per_epoch: int) -> Program:
    """The `Program` for `config` on `mesh`; nothing is computed on a device."""
    total_steps, warmup_steps = resolve_durations(config, steps_per_epoch)
    optim_config = mlc.ConfigDict(config.optim.to_dict())
    optim_config.warmup_steps = warmup_steps
    model = build_model(config, num_classes)
    tx, schedule = optim.build(
        optim_config,
        batch_size=config.batch_size,
        total_steps=total_steps,
        backbone=model.backbone,
    )
    views_fn = augment.build(config.views)
    size = config.data.image_size
    example_views = jax.eval_shape(
        views_fn, jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8), jax.random.key(0)
    )
    num_views = objectives.contract(model).num_views
    if len(example_views) != num_views:
        raise UserError(
            f"config.views has {len(example_views)} view specs, but objective "
            f"'{config.objective.name}' takes {num_views}"
        )
    example_views = tuple(jnp.zeros(v.shape, v.dtype) for v in example_views)
    abstract_state, shardings = state_lib.abstract(
        model, tx, example_views, config.seed, mesh, config.param_sharding
    )
    step = jit_train_step(model, tx, views_fn, config.seed, schedule, mesh, shardings)
    return Program(
        model, tx, schedule, views_fn, example_views, abstract_state, shardings, step, total_steps
    )


def check_batch_size(config: mlc.ConfigDict, mesh) -> None:
    """UserError unless the global batch splits evenly over the mesh's devices and processes."""
    if config.batch_size % mesh.size or config.batch_size % jax.process_count():
        raise UserError(
            f"config.batch_size={config.batch_size} must be divisible by the {mesh.size} devices"
        )


def resolve_durations(config: mlc.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from steps or epochs."""
    total = config.total_steps or math.ceil(config.total_epochs * steps_per_epoch)
    warmup = config.optim.warmup_steps or round(config.optim.warmup_epochs * steps_per_epoch)
    return total, warmup
