"""Objectives: one file per method, each a Linen `Objective(backbone, **hyperparameters)`.

`Objective.__call__(views, *, train) -> (loss, metrics)`. Class attributes declare what the
loop must provide: `num_views` (views the data pipeline makes), `mutable` (Flax collections
updated in training, e.g. "batch_stats"), and `rng_streams` (named RNG streams it draws,
e.g. "mask"). An objective with a `reconstruct(views)` method gets reconstruction images logged.
Found by module name (`config.objective.name = "mae"`), so adding one is adding one file.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import flax.linen as nn

from selfsup import backbones
from selfsup.errors import UserError


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
