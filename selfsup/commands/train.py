"""`selfsup train`: pretrain (or resume) from a config file."""

from __future__ import annotations

import sys

HELP = "pretrain (or resume) a model from a config file"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, logs and images go here")


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib
    from selfsup import train
    from selfsup.evaluators import periodic

    config = config_lib.resolve(config_lib.load(args.config), overrides)
    try:
        result = train.train_and_evaluate(config, args.workdir)
    except train.Interrupted as e:
        print(f"selfsup: {e}", file=sys.stderr)
        return 128 + e.signum
    if "loss" in result:
        # The last evaluation's test top-1s (a probe beside its random-init baseline, a
        # fine-tuned classifier) end the line.
        top1 = periodic.top1_text(result)
        top1 = f", {top1}" if top1 else ""
        print(
            f"selfsup: done, loss {result['loss']:.4f}{top1}. Logs: tensorboard --logdir "
            f"{args.workdir}",
            file=sys.stderr,
        )
    return 0
