"""Lower a config's sharded train step for accelerators without running anything.

`selfsup train --config ... --lower-only tpu,cuda` and the CI lowering tests both call
`lower_train_step`: the model, state and step are built from abstract shapes (no parameter is
initialised, no dataset needs to be present) and lowered with `lowering_platforms`, which a
CPU-only jaxlib does for `tpu` and `cuda` too. A pod user checks a config this way before paying
for the pod.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from selfsup import data
from selfsup.errors import UserError
from selfsup.parallel import sharding
from selfsup.train import step as step_lib

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
FALLBACK_NUM_CLASSES = 1000  # ImageNet's, when a config's dataset is absent on this machine


@dataclasses.dataclass(frozen=True)
class Lowered:
    """One config's train step lowered for several platforms."""

    program: step_lib.Program
    lowered: dict[str, Any]  # platform -> jax.stages.Lowered
    notes: tuple[str, ...]  # what was assumed because the dataset is absent

    @property
    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.program.abstract_state.params))

    def flops(self, platform: str) -> float | None:
        """XLA's cost estimate for one step on `platform` (the whole global batch), if any."""
        try:
            cost = self.lowered[platform].cost_analysis()
        except Exception:  # cost analysis is best-effort and backend-dependent
            return None
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else None
        flops = (cost or {}).get("flops")
        return float(flops) if flops and flops > 0 else None

    def text(self, platform: str) -> str:
        """The lowered StableHLO with its source locations (named scopes included)."""
        return self.lowered[platform].as_text(debug_info=True)


def parse_platforms(text: str) -> tuple[str, ...]:
    """ "tpu,cuda" -> ("tpu", "cuda"), each one JAX can lower for."""
    platforms = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    unknown = [p for p in platforms if p not in PLATFORMS]
    if not platforms or unknown:
        raise UserError(
            f"--lower-only {text!r}: name platforms from {', '.join(PLATFORMS)} (e.g. tpu,cuda)"
        )
    return platforms


def dataset_facts(data_config) -> tuple[int | None, int, tuple[str, ...]]:
    """(num_classes, examples in the train split, notes) for `data_config`, read from the
    dataset where it is present, assumed otherwise (a laptop checking a pod's ImageNet config)."""
    try:
        source = data.build_source(data_config, "train")
        return source.num_classes, len(source), ()
    except UserError:
        note = (
            f"dataset {data_config.get('name') or data_config.get('path')!r} is not available "
            f"here; lowered with {FALLBACK_NUM_CLASSES} classes and "
            "one step per epoch (only the learning-rate schedule's constants depend on it)"
        )
        return FALLBACK_NUM_CLASSES, 1, (note,)


def lower_train_step(config, platforms: tuple[str, ...], mesh=None) -> Lowered:
    """Build `config`'s program on `mesh` (default: the config's mesh over this machine's
    devices) and lower its train step for each platform; a UserError names what fails."""
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    step_lib.check_batch_size(config, mesh)
    num_classes, examples, notes = dataset_facts(config.data)
    steps_per_epoch = max(1, examples // config.batch_size)
    program = step_lib.build_program(config, mesh, num_classes, steps_per_epoch)
    size, batch_sharding = config.data.image_size, sharding.batch_sharding(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (config.batch_size, size, size, 3), jnp.uint8, sharding=batch_sharding
        ),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding),
    }
    traced = program.train_step.trace(program.abstract_state, batch)
    lowered = {}
    for platform in platforms:
        try:
            lowered[platform] = traced.lower(lowering_platforms=(platform,))
        except Exception as e:  # any lowering failure is the answer the user asked for
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"the train step cannot be lowered for {platform}: {first}") from e
    return Lowered(program, lowered, notes)


def report(result: Lowered, config) -> list[str]:
    """The lines `--lower-only` prints."""
    mesh = dict(result.program.abstract_state.step.sharding.mesh.shape)
    lines = [
        f"{config.objective.name} on {config.backbone.name}: {result.num_params:,} parameters, "
        f"global batch {config.batch_size}, mesh {mesh}, compute {config.compute_dtype}",
        *result.notes,
    ]
    for platform in result.lowered:
        flops = result.flops(platform)
        cost = f"{flops / 1e9:,.1f} GFLOP per step (XLA's estimate)" if flops else "no estimate"
        size = len(result.lowered[platform].as_text()) / 1024
        lines.append(f"{platform}: lowered ({size:,.0f} KiB of StableHLO); cost: {cost}")
    return lines
