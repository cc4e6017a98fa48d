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


@dataclasses.dataclass(frozen=True)
class Contract:
    """An objective's declarations as the loop reads them (`contract(model)`)."""

    num_views: int
    needs_labels: bool
    mutable: tuple[str, ...]
    rng_streams: tuple[str, ...]
    reconstructs: bool


def contract(model: nn.Module) -> Contract:
    """The `Contract` of a built objective: its declarations with the protocol's defaults, its
    backbone's collections and streams added."""
    backbone = getattr(model, "backbone", None)

    def declared(name: str) -> tuple[str, ...]:
        names = (*getattr(model, name, ()), *getattr(backbone, name, ()))
        return tuple(dict.fromkeys(names))  # in order, once each

    return Contract(
        num_views=int(getattr(model, "num_views", 1)),
        needs_labels=bool(getattr(model, "needs_labels", False)),
        mutable=declared("mutable"),
        rng_streams=declared("rng_streams"),
        reconstructs=callable(getattr(model, "reconstruct", None)),
    )


def build(objective: dict[str, Any], backbone: dict[str, Any], **defaults: Any) -> nn.Module:
    """The objective module from the config's `objective` and `backbone` dicts.

    `defaults` (e.g. the dataset's num_classes) fill the objective's fields that exist and that
    the config leaves unset or zero.
    """
    objective = dict(objective)
    backbone = dict(backbone)
    name = objective.pop("name")
    try:
        module = importlib.import_module(f"selfsup.objectives.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"selfsup.objectives.{name}":
            raise
        raise UserError(f"config.objective.name: unknown objective '{name}'") from None
    fields = {f.name for f in dataclasses.fields(module.Objective)}
    for key, value in defaults.items():
        if key in fields and not objective.get(key):
            objective[key] = value
    net = backbones.build(backbone.pop("name"), **backbone)
    return backbones.construct(
        module.Objective, objective, f"config.objective ({name})", backbone=net
    )
