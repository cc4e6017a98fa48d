"""`selfsup train`: pretrain (or resume) from a config file, or only lower its step."""

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
    parser.add_argument(
        "--lower-only",
        metavar="PLATFORMS",
        help="build the sharded train step and lower it for these platforms (e.g. tpu,cuda) "
        "without running anything; prints the parameter count and XLA's cost estimate. The "
        "mesh is this machine's devices (emulate more with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    parser.set_defaults(tune_process=tune_process)


def tune_process(args) -> None:
    """Before JAX starts: a CPU training process keeps freed host memory
    (selfsup/train/host_memory.py; SELFSUP_HOST_MEMORY=default turns it off). Never on an
    accelerator host, nor for lowering."""
    from selfsup.train import host_memory

    if not (args.lower_only or args.print_config) and host_memory.jax_runs_on_cpu_only():
        host_memory.keep_freed_memory()


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import config as config_lib

    config = config_lib.resolve(config_lib.load(args.config), overrides)
    if args.print_config:
        print(config_lib.to_json(config))
        return 0
    if args.lower_only:
        from selfsup.train import lower

        platforms = lower.parse_platforms(args.lower_only)
        for line in lower.report(lower.lower_train_step(config, platforms), config):
            print(f"selfsup: {line}", file=sys.stderr)
        return 0
    if not args.workdir:
        raise UserError(
            "--workdir is required: the folder (or gs:// URL) the run writes to "
            "(only --lower-only and --print-config run without one)"
        )

    from selfsup.evaluators import periodic
    from selfsup.train import loop

    try:
        result = loop.train_and_evaluate(config, args.workdir)
    except loop.Interrupted as e:
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
