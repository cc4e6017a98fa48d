"""`selfsup <command>`: a thin shell over the library. User mistakes print one line, no traceback.

selfsup train --config configs/quickstart.py[:arg,...] --workdir DIR [--config.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from selfsup.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised pretraining in JAX.",
        epilog="Override any config value with --config.key=value (e.g. --config.batch_size=64).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    train = commands.add_parser("train", help="pretrain (or resume) a model from a config file")
    train.add_argument("--config", required=True, help="config file, optionally path.py:arg")
    train.add_argument("--workdir", required=True, help="checkpoints, logs and images go here")
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separate `--config.key=value` (or `--config.key value`) from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: missing value (write {arg}=VALUE)")
                i += 1
                value = argv[i]
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rest, overrides = split_overrides(argv)
        args = _parser().parse_args(rest)
        if args.command == "train":
            return _train(args, overrides)
    except UserError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("selfsup: aborted", file=sys.stderr)
        return 130
    return 0


def _train(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib
    from selfsup import train

    config = config_lib.resolve(config_lib.load(args.config), overrides)
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


if __name__ == "__main__":
    sys.exit(main())
