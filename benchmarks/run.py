"""The benchmark suite in one command: throughput beside PyTorch (with MFU), matmul and ResNet
conv speed per shape, layer blocks in Linen's form and the library's, the MAE masking saving,
the input pipeline, and scaling over emulated devices; prints one table per part.

    python benchmarks/run.py --quick    # under 10 minutes on 2 idle cores; no torch.compile
    python benchmarks/run.py            # every objective, more rounds, 1/2/4/8 devices

Record the printed tables (with the load average beside them) in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import common
import conv
import layers
import masking
import matmul
import pipeline
import scaling
import throughput


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short suite")
    parser.add_argument(
        "--parts",
        default="throughput,matmul,conv,layers,masking,pipeline,scaling",
        help="comma-separated parts to run",
    )
    args = parser.parse_args(argv)
    quick = ["--quick"] if args.quick else []
    parts = [p for p in args.parts.split(",") if p]
    start = time.perf_counter()
    print(f"# selfsup benchmarks  load {common.load_average()}\n")
    consumes = 0.0
    if "throughput" in parts:
        print("## Training throughput (selfsup vs PyTorch, MFU against the jax matmul peak)")
        rows = throughput.main(quick)
        mae = [r for r in rows if r["workload"].startswith("mae") and r["impl"] == "selfsup"]
        consumes = mae[0]["img_s"] if mae else 0.0
    if "matmul" in parts:
        print("\n## The models' matmul shapes: jax vs PyTorch GFLOP/s")
        matmul.main(quick)
    if "conv" in parts:
        print("\n## ResNet-50's convs, forward + backward: XLA's conv vs fast_conv vs PyTorch")
        conv.main(quick)
    if "layers" in parts:
        print("\n## Layer blocks, forward + backward: Linen's form vs selfsup's vs PyTorch")
        layers.main(quick)
    if "masking" in parts:
        print("\n## MAE: visible-only encoder, step-time ratio vs FLOP ratio")
        masking.main(quick)
    if "pipeline" in parts:
        print("\n## Input pipeline (per host) vs the MAE step's consumption")
        pipeline.main([*quick, *(["--consumes", str(consumes)] if consumes else [])])
    if "scaling" in parts:
        print("\n## Scaling over emulated CPU devices (weak scaling), FSDP off/on")
        scaling.main(quick)
    print(f"\ntotal {time.perf_counter() - start:.0f} s  load {common.load_average()}")


if __name__ == "__main__":
    main()
