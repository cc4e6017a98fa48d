"""`selfsup eval`: run an evaluator on a checkpoint's frozen backbone.

    selfsup eval --workdir W --config configs/eval/linear_probe.py [--step N] [--random-init]
        [--config.k=v ...]

The backbone is rebuilt from the checkpoint's saved config (`meta["config"]["backbone"]`, with
the eval config's `backbone` keys laid over it) in float32, and its parameters (and mutable
collections such as BatchNorm statistics) are read as host arrays without the optimizer state.
Data default to the checkpoint's dataset. `--random-init` also runs the same protocol on the same
backbone at random initialisation (the training config's seed), the baseline to beat.

Each run writes one JSON record, `W/eval/<label>_step<N>.json` (earlier steps and evaluators keep
theirs; set `--config.label` to keep two protocols of one evaluator apart): evaluator, checkpoint
step, the exact protocol (every hyperparameter, data and view), what each split held (`data`:
split name, which images, how many, classes), results and, with `--random-init`, `random_init`.
The command prints top-1 and top-5 in percent.
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
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="also evaluate the same backbone at random initialisation (the baseline)",
    )


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib
    from selfsup import evaluators

    config = evaluators.resolve(config_lib.load(args.config), overrides)
    record = evaluate_checkpoint(args.workdir, config, step=args.step, random_init=args.random_init)
    print(summary(record), file=sys.stderr)
    return 0


def summary(record: dict) -> str:
    """One line: the splits' sizes, then each result (fractions in percent), with the random-init
    value beside it when the record has one."""
    base = record.get("random_init", {}).get("results", {})

    def show(name: str, value: float) -> str:
        percent = name.endswith(("top1", "top5"))
        text = f"{100 * value:.1f}%" if percent else f"{value:.4g}"
        if name in base:
            text += f" (random init {100 * base[name]:.1f}%)" if percent else ""
        return f"{name.replace('top', 'top-', 1)} {text}"

    data = "; ".join(
        f"{role} {d['images']} images of {d['classes']} classes ({d['split']})"
        for role, d in record["data"].items()
    )
    # Test top-1 and top-5 first, then the rest (the probe's held-out top-1, chosen lr, ...).
    names = sorted(record["results"], key=lambda k: k not in ("top1", "top5"))
    results = ", ".join(show(k, record["results"][k]) for k in names)
    return (
        f"selfsup: {record['label']} at step {record['step']}: {results} [{data}] -> "
        f"{record['path']}"
    )


def record_path(workdir: str, label: str, step: int):
    """`workdir/eval/<label>_step<step>.json`: one file per evaluator (label) and step (an
    `etils.epath.Path`: the workdir may be a URL)."""
    from selfsup.io import paths

    return paths.path(workdir) / "eval" / f"{label}_step{step}.json"


def evaluate_checkpoint(
    workdir: str, config: Any, *, step: int | None = None, random_init: bool = False
) -> dict:
    """Run the evaluator `config` (resolved, see `selfsup.evaluators.resolve`) on the backbone of
    the checkpoint `step` (latest when None) in `workdir`, and with `random_init` on the same
    backbone at random initialisation; write and return the JSON record."""
    import jax
    import jax.numpy as jnp

    from selfsup import config as config_lib
    from selfsup import evaluators
    from selfsup.errors import UserError
    from selfsup.io import checkpoint, paths
    from selfsup.io import workdir as workdir_lib
    from selfsup.parallel import sharding

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

    variables = evaluators.with_head(variables, trees["params"])  # for `classifier`
    mesh = sharding.make_mesh(config.mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    evaluator = evaluators.build(config, encode_fn, mesh=mesh)
    results = {name: float(value) for name, value in evaluator.run(variables)}

    label = evaluators.label(config)
    path = record_path(workdir, label, step)
    record = {
        "evaluator": config.name,
        "label": label,
        "workdir": str(paths.path(workdir)),
        "step": step,
        "backbone": backbone_config,
        "protocol": config.to_dict(),
        "data": evaluator.data,
        "results": results,
    }
    if random_init:
        seed = int(train_config.get("seed", config_lib.defaults().seed))
        init = jax.jit(backbone.init, out_shardings=sharding.replicated(mesh))
        initial = init(jax.random.key(seed), jnp.zeros(example.shape, example.dtype))
        baseline = evaluators.build(config, encode_fn, mesh=mesh)
        record["random_init"] = {
            "seed": seed,
            "results": {name: float(value) for name, value in baseline.run(initial)},
        }
    record.update(seconds=round(time.perf_counter() - start, 2), path=str(path))
    if jax.process_index() == 0:  # readers never see a half-written record
        paths.write_text(path, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


def _check_matches(backbone, example, variables: dict, built: dict, saved: dict) -> None:
    """UserError naming the first variable whose presence or shape differs between the backbone
    that `built` describes and the checkpoint's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from selfsup import pytree
    from selfsup.errors import UserError

    abstract = jax.eval_shape(
        backbone.init, jax.random.key(0), jnp.zeros(example.shape, example.dtype)
    )

    def by_path(tree) -> dict:
        return {name: np.shape(leaf) for name, leaf in pytree.by_path(tree).items()}

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
