"""`selfsup <command>`: a thin shell over the library. User mistakes print one line, no traceback.

Each command is a module in `selfsup/commands/` with `HELP`, `add_arguments(parser)` and
`run(args, overrides) -> exit code`, so adding a command is adding one file.

    selfsup train --config configs/quickstart.py[:arg,...] --workdir DIR [--config.key=value ...]
    selfsup train --config configs/quickstart.py:smoke --print-config   # the resolved config
    selfsup configs                                    # every config file and its variants
    selfsup data convert IMAGES_OR_NPZ --name NAME --data-dir DIR   # a TFDS dataset, no TF

Every command first joins its multi-process run, if any (`--coordinator`, `--num-processes`,
`--process-id`, `--distributed`; see selfsup/parallel/distributed.py), except those whose module
sets `LOCAL = True` (`configs`, `data`): they run in one process, without JAX, even on a pod host.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from selfsup import commands
from selfsup.errors import UserError
from selfsup.parallel import distributed


def _distributed_flags() -> argparse.ArgumentParser:
    """Flags every command takes to join a multi-process run (selfsup/parallel/distributed.py)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("multi-process runs (default: from the environment)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0 to N-1")
    group.add_argument(
        "--distributed",
        choices=distributed.MODES,
        help="auto: detect SLURM and TPU pods (the default); off: a single process",
    )
    return parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Self-supervised pretraining in JAX.",
        epilog="Override any config value with --config.key=value (e.g. --config.batch_size=64).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    flags = _distributed_flags()
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"selfsup.commands.{info.name}")
        local = getattr(module, "LOCAL", False)
        sub = subparsers.add_parser(
            info.name, help=module.HELP, description=module.HELP, parents=[] if local else [flags]
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, local=local)
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
        if getattr(args, "tune_process", None):  # before JAX starts its backends
            args.tune_process(args)
        if not args.local:
            distributed.initialize(
                args.coordinator, args.num_processes, args.process_id, mode=args.distributed
            )
        return args.run(args, overrides)
    except UserError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: stop without saving
        print("selfsup: aborted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `selfsup configs | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
