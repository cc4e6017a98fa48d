"""Objectives: one file per method, each a Linen `Objective(backbone, **hyperparameters)`
following the `Objective` protocol below. Found by module name (`config.objective.name =
"mae"`), so adding one is adding one file (and a config for its settings).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Protocol

import flax.linen as nn
import jax

from selfsup import backbones
from selfsup.errors import UserError


class Objective(Protocol):
    """What the training loop reads from an objective (class attributes; absent ones take the
    defaults in `contract`):

    - `__call__(views, *, train) -> (loss, metrics)`: views is a tuple of `num_views` arrays
      [B, H, W, 3] (sizes may differ between views); loss a scalar, metrics scalars by name;
    - `num_views`: the views the data pipeline makes (1);
    - `needs_labels`: whether `__call__` takes `labels` [B] (False);
    - `needs_teacher`: whether it learns from a frozen classifier (False): its `teacher` field
      takes a `Teacher`, which the training side reads from the checkpoint the config names
      (`selfsup.train.teacher`); objectives never read checkpoints themselves;
    - `mutable`: the Flax collections it writes in training, e.g. "batch_stats" (()); the
      backbone's are added;
    - `rng_streams`: the random streams it draws, e.g. "mask" (()); the backbone's are added,
      and the loop derives one key per stream from (seed, step);
    - optional `reconstruct(views) -> {"original", "masked", "reconstruction": [B, H, W, 3]}`:
      the loop logs reconstruction images;
    - optional `encode(images, ...)`: the encoder as the objective runs it;
    - optional field `normalize`: the objective normalises its views itself (evaluators apply
      the same normalisation).
    """

    backbone: nn.Module

    def __call__(
        self, views: tuple[jax.Array, ...], *, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]: ...


# The collection an objective keeps its teacher's variables in: outside "params", so the
# optimiser never sees them, and checkpointed with the run.
TEACHER_COLLECTION = "teacher"


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
    """A frozen classifier for an objective that `needs_teacher`: an unbound backbone and its
    host variables, read from checkpoint `step` of a run.

    variables: {"params": {"backbone", "head": {"kernel" [D, C], "bias" [C]}},
                <collection, e.g. "batch_stats">: {"backbone": ...}}.
    """

    backbone: nn.Module
    variables: dict = dataclasses.field(repr=False)
    step: int

    @property
    def num_classes(self) -> int:
        return int(self.variables["params"]["head"]["kernel"].shape[1])


@dataclasses.dataclass(frozen=True)
class Contract:
    """An objective's declarations as the loop reads them (`contract(model)`)."""

    num_views: int
    needs_labels: bool
    needs_teacher: bool
    mutable: tuple[str, ...]
    rng_streams: tuple[str, ...]
    reconstructs: bool


def contract(model: nn.Module | type) -> Contract:
    """The `Contract` of a built objective: its declarations with the protocol's defaults, its
    backbone's collections and streams added. Of an objective class (`find`): its own
    declarations only, before the objective is built."""
    backbone = getattr(model, "backbone", None)

    def declared(name: str) -> tuple[str, ...]:
        names = (*getattr(model, name, ()), *getattr(backbone, name, ()))
        return tuple(dict.fromkeys(names))  # in order, once each

    return Contract(
        num_views=int(getattr(model, "num_views", 1)),
        needs_labels=bool(getattr(model, "needs_labels", False)),
        needs_teacher=bool(getattr(model, "needs_teacher", False)),
        mutable=declared("mutable"),
        rng_streams=declared("rng_streams"),
        reconstructs=callable(getattr(model, "reconstruct", None)),
    )


def find(name: str) -> type:
    """The `Objective` class of `selfsup.objectives.<name>`; UserError for an unknown name."""
    try:
        module = importlib.import_module(f"selfsup.objectives.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"selfsup.objectives.{name}":
            raise
        raise UserError(f"config.objective.name: unknown objective '{name}'") from None
    return module.Objective


def build(objective: dict[str, Any], backbone: dict[str, Any], **defaults: Any) -> nn.Module:
    """The objective module from the config's `objective` and `backbone` dicts.

    `defaults` (e.g. the dataset's num_classes) fill the objective's fields that exist and that
    the config leaves unset or zero. An objective that `needs_teacher` takes the dict that
    `selfsup.train.teacher.with_teacher` returns (the teacher loaded).
    """
    objective = dict(objective)
    backbone = dict(backbone)
    name = objective.pop("name")
    cls = find(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in defaults.items():
        if key in fields and not objective.get(key):
            objective[key] = value
    net = backbones.build(backbone.pop("name"), **backbone)
    return backbones.construct(cls, objective, f"config.objective ({name})", backbone=net)
