"""The matmuls the models are made of: GFLOP/s through jax (XLA:CPU) and PyTorch, interleaved.

Explains the throughput table: a ViT step is ~80% matmul time on XLA:CPU (jax.profiler trace of
the MAE step, BENCHMARKS.md), so its MFU and its ratio to PyTorch follow the per-shape matmul
speed of the two libraries. Shapes (float32, [M, K] @ [K, N]): the 2048^3 peak, and MAE
ViT-B/16 at 112 px batch 16 (encoder: 16 x 13 visible tokens; decoder: 16 x 50 tokens), and the
two backward products of the encoder's fc1 as the gradient computes them (a transposed operand).

    python benchmarks/matmul.py [--quick]
"""

from __future__ import annotations

import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPES = {
    # name: (M, K, N, which operand is stored transposed: "", "a" ([K, M]) or "b" ([N, K]))
    "peak 2048^3": (2048, 2048, 2048, ""),
    "enc qkv [208,768]x[768,2304]": (208, 768, 2304, ""),
    "enc fc1 [208,768]x[768,3072]": (208, 768, 3072, ""),
    "enc fc1 d_input [208,3072]x[768,3072]^T": (208, 3072, 768, "b"),
    "enc fc1 d_kernel [208,768]^T x[208,3072]": (768, 208, 3072, "a"),
    "enc fc2 [208,3072]x[3072,768]": (208, 3072, 768, ""),
    "dec fc1 [800,512]x[512,2048]": (800, 512, 2048, ""),
    "dec fc2 [800,2048]x[2048,512]": (800, 2048, 512, ""),
}


def timers(m: int, k: int, n: int, transposed: str, reps: int) -> dict:
    """{"jax": fn, "torch": fn}: each times `reps` products and returns seconds per product."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((k, m) if transposed == "a" else (m, k), np.float32)
    b = rng.standard_normal((n, k) if transposed == "b" else (k, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    # A transposed operand is a strided view in torch (as autograd passes it), a transpose in jax.
    if transposed == "a":
        ta, dot = ta.t(), jax.jit(lambda x, y: x.T @ y)
    elif transposed == "b":
        tb, dot = tb.t(), jax.jit(lambda x, y: x @ y.T)
    else:
        dot = jax.jit(jnp.dot)
    dot(ja, jb).block_until_ready()

    def time_jax() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            dot(ja, jb).block_until_ready()
        return (time.perf_counter() - start) / reps

    def time_torch() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(ta, tb)
        return (time.perf_counter() - start) / reps

    return {"jax": time_jax, "torch": time_torch}


def main(argv: list[str] | None = None) -> list[dict]:
    rounds = common.kernel_rounds(argv, __doc__)
    rows = []
    for name, (m, k, n, transposed) in SHAPES.items():
        reps = max(1, int(2e9 // (2 * m * k * n)))  # ~2 GFLOP per timing
        times = common.interleave(timers(m, k, n, transposed, reps), rounds, settle=True)
        flops = 2.0 * m * k * n
        rows.append(
            {
                "matmul": name,
                "jax_gflop_s": flops / times["jax"] / 1e9,
                "torch_gflop_s": flops / times["torch"] / 1e9,
                "jax/torch": times["torch"] / times["jax"],
                "load": common.load_average(),
            }
        )
    print(common.table(rows, ("matmul", "jax_gflop_s", "torch_gflop_s", "jax/torch", "load")))
    return rows


if __name__ == "__main__":
    main()
