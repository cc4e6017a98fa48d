#!/usr/bin/env python3
"""Write an sbatch script that trains with selfsup on a multi-node GPU SLURM job, and requeues it.

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --setup 'source ~/venv/bin/activate' \\
        --config configs/mae_vit_in1k.py --workdir /shared/runs/mae_b16 > mae.sbatch
    sbatch mae.sbatch

One process per GPU (`--per gpu`, the default: JAX gives task SLURM_LOCALID the GPU of that
index, so every task must see all the node's GPUs, which `--gpus-per-node` does) or one per node
(`--per node`: JAX_LOCAL_DEVICE_IDS lists all the node's GPUs). `selfsup` reads the coordinator,
the process count and its id from SLURM_* inside the `srun` step (selfsup/parallel/distributed.py).

Resources: `--cpus-per-task` (default 8 per GPU the task drives: the host decodes images on 8
threads) and `--mem` (default 0: all of each node's memory). `srun` repeats `--cpus-per-task`
(since SLURM 22.05 it no longer inherits it from sbatch).

Failures and preemption: `srun --kill-on-bad-exit=1`, so one failed task ends the job instead of
leaving the others waiting in a collective until the time limit. `--requeue` and
`--signal=B:USR1@<seconds>`: on USR1 the batch shell sends SIGTERM to the training tasks
(`scancel --signal=TERM`, which spares the shell itself); every process stops at the same step,
saves a checkpoint and exits with 143, which each task's wrapper turns into 0 (a stop that saved
is not a failure, so no task kills the others mid-save); the shell then requeues the job, which
resumes from that checkpoint with the same command. A SIGTERM to the shell (scheduler
preemption) is forwarded the same way and waited for. `--output` is appended to across requeues.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

INTERRUPTED = 128 + 15  # selfsup's exit code after SIGTERM, once its checkpoint is saved
CPUS_PER_GPU = 8  # the data loader's decode threads per process (selfsup/data/loader.py)


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--config.key=value` (or `--config.key value`) go to selfsup unchanged."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):
                i += 1
                arg = f"{arg}={argv[i]}"
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Print an sbatch script for a multi-node selfsup training job.",
        epilog="Other arguments of the form --config.key=value are passed to `selfsup train`.",
    )
    p.add_argument("--config", required=True, help="selfsup config, path.py[:arg]")
    p.add_argument("--workdir", required=True, help="shared directory every node can write")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--per", choices=("gpu", "node"), default="gpu", help="one process per ...")
    p.add_argument("--job-name", default="selfsup")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--time", help="time limit, e.g. 24:00:00")
    p.add_argument("--cpus-per-task", type=int, help="default: 8 per GPU of the task")
    p.add_argument("--mem", default="0", help="memory per node, e.g. 480G (default 0: all)")
    p.add_argument("--signal-seconds", type=int, default=120, help="USR1 this long before the end")
    p.add_argument("--chdir", default=os.getcwd(), help="where configs/ is (default: here)")
    p.add_argument("--output", default="%x-%j.out", help="the job's log (relative to --chdir)")
    p.add_argument("--setup", action="append", default=[], help="shell line run first (repeatable)")
    p.add_argument(
        "--sbatch", action="append", default=[], metavar="OPTION", help="extra #SBATCH option"
    )
    p.add_argument("-o", "--out", help="write the script here instead of stdout")
    return p


def script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    """The sbatch script's text."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("slurm.py: error: --nodes and --gpus-per-node must be >= 1")
    tasks = args.gpus_per_node if args.per == "gpu" else 1
    layout = "one process per GPU" if args.per == "gpu" else "one process per node"
    if args.cpus_per_task is None:
        args.cpus_per_task = CPUS_PER_GPU * args.gpus_per_node // tasks
    if args.cpus_per_task < 1:
        raise SystemExit("slurm.py: error: --cpus-per-task must be >= 1")
    options = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={args.gpus_per_node}",
    ]
    for name in ("partition", "account", "qos", "time", "cpus_per_task", "mem"):
        value = getattr(args, name)
        if value is not None:
            options.append(f"--{name.replace('_', '-')}={value}")
    options += [
        f"--chdir={args.chdir}",
        f"--output={args.output}",
        "--open-mode=append",
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",
        *(o if o.startswith("-") else f"--{o}" for o in args.sbatch),
    ]
    train = ["selfsup", "train", "--config", args.config, "--workdir", args.workdir, *overrides]
    # Each task: SIGTERM waits for selfsup (the trap defers it), and a saved stop exits 0.
    task = (
        f'trap : TERM; "$@"; status=$?; if [ "$status" -eq {INTERRUPTED} ]; then exit 0; fi; '
        'exit "$status"'
    )
    lines = [
        "#!/bin/bash",
        f"# selfsup train on {args.nodes} node(s) x {args.gpus_per_node} GPU(s), {layout}.",
        "# Generated by launch/slurm.py. Submit with: sbatch <this file>",
        *(f"#SBATCH {o}" for o in options),
        "",
        *args.setup,
    ]
    if args.per == "node":
        ids = ",".join(map(str, range(args.gpus_per_node)))
        lines += [
            "# One process sees all the node's GPUs (JAX would give it GPU SLURM_LOCALID only).",
            f"export JAX_LOCAL_DEVICE_IDS={ids}",
        ]
    lines += [
        "",
        "stop_tasks() {  # SIGTERM to the tasks: they agree on a step, save, and srun returns 0",
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        '  wait "$train_pid"',
        "}",
        "requeue() {",
        '  echo "selfsup: USR1 (time limit or preemption ahead): checkpoint, then requeue"',
        "  stop_tasks",
        "  status=$?",
        # 0: saved (a run that had just finished resumes as finished and ends at once).
        '  if [ "$status" -eq 0 ]; then scontrol requeue "$SLURM_JOB_ID"; fi',
        '  exit "$status"',
        "}",
        "trap requeue USR1",
        "trap 'stop_tasks; exit \"$?\"' TERM",
        "",
        f"srun --label --kill-on-bad-exit=1 --cpus-per-task={args.cpus_per_task} "
        f"bash -c {shlex.quote(task)} selfsup-task {shlex.join(train)} &",
        "train_pid=$!",
        'wait "$train_pid"  # returns early when a trapped signal arrives; the trap then runs',
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    rest, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(rest)
    text = script(args, overrides)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}; submit it with: sbatch {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
