"""Where a train step's time goes: per-op totals from a `jax.profiler` trace of the library's step.

Traces `--steps` steps of one throughput workload (`throughput.WORKLOADS`; `--given`: fed views
made outside the step, like for like with the PyTorch references) and prints the XLA ops' time
summed by kind (the op name without its `.N` suffix: `ynn_fusion`, `dot`, `copy_bitcast_fusion`,
...), by source (the JAX operation each op came from, per the compiled HLO's metadata, with
block indices folded: `fwd decoder_blocks_*/mlp/fc1/dot_general`) and the slowest single ops,
per step. The trace stays in `--trace-dir` for Perfetto or
TensorBoard. This is how BENCHMARKS.md's *Why, from the profiles* was read.

    taskset -c 0 python benchmarks/op_profile.py --only simclr/resnet50 --given

`--torch` profiles the workload's PyTorch reference step instead (eager, `torch.profiler`),
its ops by self CPU time per step, for the same comparison from the other side.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from pathlib import Path

import common
import jax
import throughput

# Trace events that are not XLA ops: the Python frames and the executor's own spans.
NOT_OPS = ("$", "ThunkExecutor", "PjitFunction")
# An HLO instruction and the JAX operation it came from: `  %name = ... op_name="..."`.
OP_NAME = r'^\s+(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"'


def op_times(trace_dir: str) -> collections.Counter:
    """{op name: total microseconds} from the Perfetto trace `jax.profiler` wrote."""
    (path,) = sorted(Path(trace_dir).rglob("*.trace.json.gz"))[-1:]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    out = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(NOT_OPS):
            out[e["name"]] += e["dur"]
    return out


def sources(hlo_text: str) -> dict[str, str]:
    """{op name: the JAX operation it came from} from the compiled HLO's `op_name` metadata;
    'fwd ' / 'bwd ' for the forward / backward pass, block indices folded to '*'."""
    out = {}
    for name, op in re.findall(OP_NAME, hlo_text, re.M):
        op = re.sub(r"blocks_\d+", "blocks_*", op.replace("jit(train_step)/", "", 1))
        op = re.sub(r"^transpose\(jvp\([^)]*\)\)/", "bwd ", op)
        out.setdefault(name, re.sub(r"^jvp\([^)]*\)/", "fwd ", op))
    return out


def torch_profile(name: str, steps: int, top: int) -> None:
    """Print the PyTorch reference step's ops by self CPU time per step."""
    from torch.profiler import ProfilerActivity, profile

    w = throughput.WORKLOADS[name]
    if not w.torch:
        raise SystemExit(f"{name} has no PyTorch reference")
    common.match_torch_threads()
    trainer = throughput.torch_trainers(w.torch, w.batch, w.size, compiled=False)["torch eager"]
    step_s = min(trainer.step() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(
        f"{name}, PyTorch eager: step {step_s:.3g} s untraced, {total / 1e6 / steps:.3g} s traced\n"
    )
    rows = [
        {"op": e.key, "ms/step": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps}
        for e in events
    ]
    print(common.table(rows, ("op", "ms/step", "calls")))


def main(argv: list[str] | None = None) -> collections.Counter | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="simclr/resnet50", choices=sorted(throughput.WORKLOADS))
    parser.add_argument("--given", action="store_true", help="views made outside the step")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--trace-dir", default="")
    parser.add_argument("--torch", action="store_true", help="profile the PyTorch reference")
    args = parser.parse_args(argv)
    if args.torch:
        return torch_profile(args.only, args.steps, args.top)
    config = throughput.workload_config(throughput.WORKLOADS[args.only], args.given)
    step = common.library_step(config)
    step_s = step.run(3)  # warm: the first calls allocate
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="selfsup-trace-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        step.run(args.steps)
    ops = op_times(trace_dir)
    kinds, by_source = collections.Counter(), collections.Counter()
    source = sources(step.fn.as_text())
    for name, us in ops.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
        by_source[source.get(name, "(no metadata)")] += us
    total = sum(ops.values())
    print(f"{args.only}{' (views given)' if args.given else ''}: step {step_s:.3g} s untraced,")
    print(f"XLA ops {total / 1e6 / args.steps:.3g} s per step traced; trace in {trace_dir}\n")
    for title, counter in (("op kind", kinds), ("source", by_source), ("op", ops)):
        rows = [
            {title: name, "ms/step": us / 1e3 / args.steps, "share": us / total}
            for name, us in counter.most_common(args.top)
        ]
        print(common.table(rows, (title, "ms/step", "share")) + "\n")
    return kinds


if __name__ == "__main__":
    main()
