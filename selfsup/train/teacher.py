"""The frozen classifier a distilling objective learns from, read from a run's checkpoint.

An objective that declares `needs_teacher` (see `selfsup.objectives.Objective`) takes an
`objectives.Teacher` in its `teacher` field; the config names it by a workdir
(`config.objective.teacher`) and a step (`config.objective.teacher_step`, 0: the latest).
`with_teacher` swaps the one for the other before the objective is built, so objectives never
read checkpoints themselves.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import jax.numpy as jnp

from selfsup import backbones, objectives
from selfsup.errors import UserError
from selfsup.io import checkpoint


def with_teacher(objective: dict[str, Any], dtype: Any = jnp.float32) -> dict[str, Any]:
    """The config's objective dict, with the teacher loaded (computing in `dtype`) when the
    objective declares `needs_teacher`: `teacher` (a workdir) becomes the `objectives.Teacher`
    in its checkpoint `teacher_step`, which is dropped. Other objectives' dicts come back as
    they are."""
    name = objective["name"]
    if not objectives.contract(objectives.find(name)).needs_teacher:
        return objective
    objective = dict(objective)
    workdir, step = objective.get("teacher", ""), objective.pop("teacher_step", 0)
    if not workdir:
        raise UserError(f"{name}: set config.objective.teacher to the workdir of a fine-tuned run")
    # Local paths absolute, so the cache does not depend on the working directory.
    path = workdir if "://" in workdir else os.path.abspath(workdir)
    objective["teacher"] = load(path, step, dtype, name)
    return objective


@functools.lru_cache(maxsize=4)
def load(workdir: str, step: int = 0, dtype: Any = jnp.float32, user: str = "distill"):
    """The classifier in `workdir`'s checkpoint `step` (0: the latest), computing in `dtype`,
    as an `objectives.Teacher`; `user` (the objective's name) starts the error messages.

    Raises UserError when the checkpoint is missing, has no `backbone` + Dense `head`, or its
    config cannot build the backbone. Cached: the teacher is read once per process.
    """
    trees, meta = checkpoint.restore_tree(workdir, ("params", "model_state"), step or None)
    params = trees["params"]
    head = params.get("head") if isinstance(params, dict) else None
    if "backbone" not in params or not isinstance(head, dict) or set(head) != {"kernel", "bias"}:
        raise UserError(
            f"{user}: the checkpoint in {workdir} has no classifier (params 'backbone' and a "
            "Dense 'head'); set config.objective.teacher to the workdir of a fine-tuning run "
            "(objective 'supervised') or of a distill run"
        )
    backbone_config = dict(meta.get("config", {}).get("backbone", {}))
    name = backbone_config.pop("name", None)
    if not name:
        raise UserError(
            f"{user}: the checkpoint in {workdir} records no backbone config; it was not "
            "written by selfsup's training loop"
        )
    backbone_config["dtype"] = dtype
    module = importlib.import_module(f"selfsup.backbones.{name}")
    # parent=None: an unbound module, never adopted by the student it is built inside.
    net = backbones.construct(
        module.Model, backbone_config, f"teacher backbone ({name})", parent=None
    )
    variables = {"params": {"backbone": params["backbone"], "head": head}}
    for collection, tree in trees["model_state"].items():
        # A distill run's checkpoint holds its own teacher in model_state: not this teacher's.
        if collection != objectives.TEACHER_COLLECTION and isinstance(tree, dict):
            if "backbone" in tree:
                variables[collection] = {"backbone": tree["backbone"]}
    return objectives.Teacher(net, variables, int(meta["step"]))
