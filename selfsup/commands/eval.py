"""`selfsup eval`: run an evaluator on a checkpoint's frozen backbone.

    selfsup eval --workdir W --config configs/eval/linear_probe.py [--step N] [--config.k=v ...]

The backbone is rebuilt from the checkpoint's saved config (`meta["config"]["backbone"]`, with
the eval config's `backbone` keys laid over it) in float32, and its parameters (and mutable
collections such as BatchNorm statistics) are read as host arrays without the optimizer state.
Data default to the checkpoint's dataset. The result is one JSON record in `W/eval_<label>.json`:
evaluator, checkpoint step, the exact protocol (every hyperparameter, data and view), results.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

HELP = "evaluate a checkpoint's frozen backbone (linear probe, k-NN, attentive probe)"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="evaluator config file, path.py[:arg]")
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib
    from selfsup import evaluators

    config = evaluators.resolve(config_lib.load(args.config), overrides)
    record = evaluate_checkpoint(args.workdir, config, step=args.step)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record["results"].items())
    print(
        f"selfsup: {record['label']} at step {record['step']}: {shown} -> {record['path']}",
        file=sys.stderr,
    )
    return 0


def evaluate_checkpoint(workdir: str, config: Any, *, step: int | None = None) -> dict:
    """Run the evaluator `config` (resolved, see `selfsup.evaluators.resolve`) on the backbone of
    the checkpoint `step` (latest when None) in `workdir`; write and return the JSON record."""
    import jax

    from selfsup import checkpoint, evaluators, paths, sharding
    from selfsup import workdir as workdir_lib
    from selfsup.errors import UserError

    start = time.perf_counter()
    if paths.is_url(workdir) or os.path.lexists(workdir):  # the record is written there at the end
        workdir_lib.prepare(workdir, create=False)
    # Parameters and mutable collections (BatchNorm statistics), never the optimizer state.
    trees, meta = checkpoint.restore_tree(workdir, ("params", "model_state"), step)
    step = int(meta["step"])
    train_config = meta.get("config")
    if not isinstance(train_config, dict) or "backbone" not in train_config:
        raise UserError(
            f"checkpoint {workdir} step {step} has no saved config with a backbone: evaluate a "
            "checkpoint written by `selfsup train`"
        )
    config = evaluators.inherit(config, train_config)
    backbone_config = {**train_config["backbone"], **config.backbone.to_dict()}
    backbone, encode_fn, example = evaluators.build_backbone(
        backbone_config, config.view, config.data.image_size
    )
    variables = evaluators.backbone_variables(trees["params"], trees["model_state"])
    _check_matches(backbone, example, variables, backbone_config, train_config["backbone"])

    mesh = sharding.make_mesh(config.mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    evaluator = evaluators.build(config, encode_fn, mesh=mesh)
    results = {name: float(value) for name, value in evaluator.run(variables)}

    label = evaluators.label(config)
    path = paths.path(workdir) / f"eval_{label}.json"
    record = {
        "evaluator": config.name,
        "label": label,
        "workdir": str(paths.path(workdir)),
        "step": step,
        "backbone": backbone_config,
        "protocol": config.to_dict(),
        "results": results,
        "seconds": round(time.perf_counter() - start, 2),
        "path": str(path),
    }
    if jax.process_index() == 0:  # readers never see a half-written record
        paths.write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


def _check_matches(backbone, example, variables: dict, built: dict, saved: dict) -> None:
    """UserError naming the first variable whose presence or shape differs between the backbone
    that `built` describes and the checkpoint's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from selfsup import sharding
    from selfsup.errors import UserError

    abstract = jax.eval_shape(
        backbone.init, jax.random.key(0), jnp.zeros(example.shape, example.dtype)
    )

    def by_path(tree) -> dict:
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {sharding.path_str(p): np.shape(leaf) for p, leaf in flat}

    want, have = by_path(dict(abstract)), by_path(variables)
    fix = (
        f"the checkpoint's backbone is {saved}; evaluate it with that backbone (drop the eval "
        "config's backbone keys) or pick the matching checkpoint"
    )
    missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing:
        raise UserError(
            f"backbone mismatch: {built} has {missing[0]} but the checkpoint does not; {fix}"
        )
    if extra:
        raise UserError(
            f"backbone mismatch: the checkpoint has {extra[0]} but {built} does not; {fix}"
        )
    for key in sorted(want):
        if want[key] != have[key]:
            raise UserError(
                f"backbone mismatch: {key} is {have[key]} in the checkpoint but {want[key]} in "
                f"{built}; {fix}"
            )
