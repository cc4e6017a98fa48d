"""`selfsup train`: pretrain (or resume) from a config file."""

from __future__ import annotations

import sys

from selfsup.errors import UserError

HELP = "pretrain (or resume) a model from a config file"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    parser.add_argument("--workdir", help="checkpoints, logs and images go here (or gs://...)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults, variant, overrides) as JSON and exit",
    )


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib

    config = config_lib.resolve(config_lib.load(args.config), overrides)
    if args.print_config:
        print(config_lib.to_json(config))
        return 0
    if not args.workdir:
        raise UserError("--workdir is required: the folder (or gs:// URL) the run writes to")

    from selfsup import train

    try:
        result = train.train_and_evaluate(config, args.workdir)
    except train.Interrupted as e:
        print(f"selfsup: {e}", file=sys.stderr)
        return 128 + e.signum
    if "loss" in result:
        print(
            f"selfsup: done, loss {result['loss']:.4f}. Logs: tensorboard --logdir {args.workdir}",
            file=sys.stderr,
        )
    return 0
