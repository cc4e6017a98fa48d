"""Training throughput per objective x backbone, beside PyTorch, against the matmul peak.

For each workload: selfsup's own jitted train step (`common.library_step`) and, where one is
written (`torch_reference`), the PyTorch step eager and under `torch.compile`, timed interleaved
in this process. Reports images/s, step time, compile time, XLA's FLOPs per step, MFU (achieved
FLOP/s over the FLOP/s of a float32 2048^3 jax matmul timed interleaved with the steps), XLA's
temporary memory (the activations' peak), the params + optimizer state per device, the
process' peak resident memory (a high-water mark: run one workload per process to read it per
workload), and the ratio torch step time / selfsup step time (> 1: selfsup is faster). Beside
a PyTorch reference, selfsup's step is also timed fed views made outside it (`views given`: the
references' inputs are augmented tensors already), and `torch/given` is the ratio against that.

    python benchmarks/throughput.py [--quick] [--only mae/vit-B16,simclr/resnet50]
    taskset -c 0 python benchmarks/throughput.py ...   # one core each: fairer on a loaded machine
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import sys

import common
import ml_collections as mlc
import torch
import torch_reference

# Sizes that fit the 2-core CPU machine: paper models at reduced resolution and batch.
AIM_TRUNK = {"name": "vit", "cls_token": False, "pool": "gap", "use_bias": False}


@dataclasses.dataclass(frozen=True)
class Workload:
    spec: str
    size: int
    batch: int
    keys: tuple = ()  # (dotted key, value) pairs laid over the config
    torch: str = ""  # "mae" / "simclr": the PyTorch reference to time beside it
    quick: bool = False  # part of --quick


WORKLOADS = {
    "mae/vit-B16": Workload("configs/mae_vit_in1k.py", 112, 16, torch="mae", quick=True),
    "simclr/resnet50": Workload(
        "configs/simclr_resnet_in1k.py", 64, 16, torch="simclr", quick=True
    ),
    # SimMIM masks 32-px cells: the image size must be a multiple of 32.
    "simmim/vit-B16": Workload("configs/simmim_vit_in1k.py", 128, 16),
    # AIM's recipe is AIM-0.6B (width 1536, depth 24) with a 12-block 2048-wide MLP head: 0.6B +
    # 0.4B parameters, over 17 GB resident with AdamW on CPU. Here: a ViT-B/16 trunk laid out as
    # AIM's (no cls token, no biases, pooled) and an 8-block 512-wide head.
    "aim/vit-B16": Workload(
        "configs/aim_vit_in1k.py",
        112,
        16,
        (
            ("backbone", {**AIM_TRUNK, "variant": "B/16"}),
            ("objective.head_width", 512),
            ("objective.head_depth", 8),
        ),
    ),
    # The builtin config's views crop 32 px (scaled to 16 by `small_config`): set 112-px ones.
    "supervised/vit-B16": Workload(
        "configs/supervised_vit_builtin.py",
        112,
        16,
        (
            ("backbone", {"name": "vit", "variant": "B/16", "pool": "gap"}),
            ("views", ("rrc(112, scale=(0.35, 1.0))|flip|normalize('imagenet')",)),
        ),
    ),
    # SparK masks 32-px cells: 64 px is a 2x2 grid (2 of 4 cells kept at mask ratio 0.6).
    "spark/resnet50": Workload("configs/spark_resnet_in1k.py", 64, 16),
    "barlow_twins/resnet50": Workload("configs/barlow_twins_resnet_in1k.py", 64, 16),
    "swav/resnet50": Workload("configs/swav_resnet_in1k.py", 64, 16),
    "rotation/resnet50": Workload("configs/rotation_resnet_in1k.py", 64, 16),
}

COLUMNS = (
    "workload",
    "px",
    "batch",
    "impl",
    "step_s",
    "img_s",
    "compile_s",
    "gflop",
    "gflop_s",
    "peak_gflop_s",
    "mfu",
    "temp_mib",
    "state_mib",
    "rss_gib",
    "torch/selfsup",
    "torch/given",
    "load",
)
GIVEN = "selfsup, views given"  # the step without its augmentation (see `views_given`)


def peak_rss_gib() -> float:
    """The process' peak resident memory so far (GiB): a high-water mark, so with several
    workloads in one process a row shows the peak over it and the rows before it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def torch_trainers(kind: str, batch: int, size: int, compiled: bool) -> dict:
    """{"torch eager": Trainer[, "torch.compile": Trainer]} for a reference model."""
    torch.manual_seed(0)
    if kind == "mae":
        make, inputs = (lambda: torch_reference.MAE(size)), torch_reference.mae_inputs(batch, size)
    else:
        make, inputs = torch_reference.SimCLR, torch_reference.simclr_inputs(batch, size)
    out = {"torch eager": torch_reference.Trainer(make(), inputs, compiled=False)}
    if compiled:
        out["torch.compile"] = torch_reference.Trainer(make(), inputs, compiled=True)
    return out


def views_given(views: tuple[str, ...]) -> tuple[str, ...]:
    """Each view spec reduced to its `normalize` op: the step fed views made outside it, as the
    PyTorch references are (their inputs are augmented float tensors already)."""
    kept = ("|".join(op for op in v.split("|") if op.startswith("normalize")) for v in views)
    return tuple(v or "normalize('none')" for v in kept)


def workload_config(w: Workload, given: bool = False) -> mlc.ConfigDict:
    """The workload's CPU-sized config; `given`: its views reduced by `views_given`."""
    config = common.small_config(w.spec, image_size=w.size, batch_size=w.batch, **dict(w.keys))
    if not given:
        return config
    keys = {**dict(w.keys), "views": views_given(tuple(config.views))}
    return common.small_config(w.spec, image_size=w.size, batch_size=w.batch, **keys)


def run_workload(name: str, w: Workload, rounds: int, compiled: bool) -> list[dict]:
    """Rows of the table for one workload (selfsup first, then the references). A workload with
    a PyTorch reference also times selfsup's step without its on-device augmentation (`views
    given`), the like-for-like comparison: `torch/selfsup` is against the whole step,
    `torch/given` against that one."""
    steps = {"selfsup": common.library_step(workload_config(w))}
    if w.torch:
        steps[GIVEN] = common.library_step(workload_config(w, given=True))
    for step in steps.values():
        step.run(1)  # the first call allocates; not timed
    peak_time, peak_flops = common.matmul_timer()
    fns = {label: step.run for label, step in steps.items()}
    fns["matmul"] = peak_time
    compile_s = {}
    refs = torch_trainers(w.torch, w.batch, w.size, compiled) if w.torch else {}
    for label, trainer in refs.items():
        trainer.step()
        fns[label] = trainer.step
        compile_s[label] = trainer.compile_s
    # Untimed: in the first rounds the host heap grows to hold every step's buffers at once
    # (page faults; selfsup.train.host_memory keeps it from then on), as in a run's first steps.
    common.interleave(fns, 2)
    times = common.interleave(fns, rounds)
    load = common.load_average()
    peak = peak_flops / times["matmul"]
    rows = [
        {
            "workload": name,
            "px": w.size,
            "batch": w.batch,
            "impl": label,
            "step_s": times[label],
            "img_s": w.batch / times[label],
            "compile_s": step.compile_s,
            "gflop": step.flops / 1e9,
            "gflop_s": step.flops / times[label] / 1e9,
            "peak_gflop_s": peak / 1e9,
            "mfu": step.flops / times[label] / peak,
            "temp_mib": step.temp_mib,
            "state_mib": step.state_mib,
            "rss_gib": peak_rss_gib(),
            "load": load,
        }
        for label, step in steps.items()
    ]
    for label in refs:
        rows.append(
            {
                "workload": name,
                "px": w.size,
                "batch": w.batch,
                "impl": label,
                "step_s": times[label],
                "img_s": w.batch / times[label],
                "compile_s": compile_s[label] or None,
                "torch/selfsup": times[label] / times["selfsup"],
                "torch/given": times[label] / times[GIVEN],
                "load": load,
            }
        )
    del steps, refs
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="MAE and SimCLR only, 3 rounds, PyTorch eager only (no torch.compile builds)",
    )
    parser.add_argument("--only", default="", help="comma-separated workload names")
    parser.add_argument("--rounds", type=int, default=0, help="timed steps per implementation")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [
        n for n, w in WORKLOADS.items() if w.quick or not args.quick
    ]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        sys.exit(f"unknown workload {unknown[0]}; known: {', '.join(WORKLOADS)}")
    rounds = args.rounds or (3 if args.quick else 5)
    common.match_torch_threads()
    # torch.compile's builds take minutes on 2 cores (200-350 s under load): not in --quick.
    no_compile = args.no_compile or args.quick
    why_not = "" if no_compile else torch_reference.compile_works()
    if why_not:
        print(f"torch.compile does not work here ({why_not}); eager only", file=sys.stderr)
    compiled = not no_compile and not why_not
    rows = []
    for name in names:
        new = run_workload(name, WORKLOADS[name], rounds, compiled)
        print("\n".join(common.table(new, COLUMNS).splitlines()[2:]), flush=True)
        rows += new
    print(common.table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
