"""ResNet-50's convolutions, forward + backward: XLA's conv against the library's `fast_conv`
(the dot form the ResNets use), with PyTorch's conv2d beside them, interleaved in one process.

Explains the SimCLR ResNet-50 row of the throughput table: XLA:CPU runs some conv shapes, and
more of their gradients, far below its matmul speed. Shapes are those of ResNet-50 (torchvision
v1.5 layout: the stride on the 3x3) at 64 px on a batch of 32 (SimCLR's 2 views x 16), NHWC
float32; each timing is `jax.grad` of sum(conv(x, w) * g) with respect to x and w.

    python benchmarks/conv.py [--quick]
"""

from __future__ import annotations

import time

import common
import jax
import jax.numpy as jnp
import numpy as np
import torch

from selfsup.ops import conv_general_dilated as fast_conv  # its CPU form, on this CPU

BATCH = 32
# name: (input side, in channels, out channels, kernel, stride)
SHAPES = {
    "stem 7x7/2 3->64 64->32": (64, 3, 64, 7, 2),
    "stage1 1x1 256->64 @16": (16, 256, 64, 1, 1),
    "stage1 3x3 64->64 @16": (16, 64, 64, 3, 1),
    "stage2 1x1 128->512 @8": (8, 128, 512, 1, 1),
    "stage2 down 1x1/2 256->512 16->8": (16, 256, 512, 1, 2),
    "stage3 1x1 1024->256 @4": (4, 1024, 256, 1, 1),
    "stage3 3x3 256->256 @4": (4, 256, 256, 3, 1),
    "stage4 3x3/2 512->512 4->2": (4, 512, 512, 3, 2),
    "stage4 3x3 512->512 @2": (2, 512, 512, 3, 1),
    "stage4 1x1 512->2048 @2": (2, 512, 2048, 1, 1),
}


def timers(side: int, cin: int, cout: int, k: int, stride: int, reps: int) -> dict:
    """{"xla": fn, "fast_conv": fn, "torch": fn}: each returns seconds per forward + backward."""
    pad = ((k // 2, k // 2),) * 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, side, side, cin), np.float32)
    w = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    out_side = (side + 2 * (k // 2) - k) // stride + 1
    g = rng.standard_normal((BATCH, out_side, out_side, cout), np.float32)
    jx, jw, jg = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)

    def grads(conv):
        def loss(x, w):
            y = conv(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(y * jg)

        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(fn(jx, jw))

        def once() -> float:
            start = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fn(jx, jw))
            return (time.perf_counter() - start) / reps

        return once

    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

    def time_torch() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            y = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=k // 2)
            tx.grad = tw.grad = None
            y.backward(tg)
        return (time.perf_counter() - start) / reps

    return {
        "xla": grads(jax.lax.conv_general_dilated),
        "fast_conv": grads(fast_conv),
        "torch": time_torch,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    rounds = common.kernel_rounds(argv, __doc__)
    rows = []
    for name, (side, cin, cout, k, stride) in SHAPES.items():
        out_side = (side + 2 * (k // 2) - k) // stride + 1
        flops = 3 * 2.0 * BATCH * out_side**2 * k * k * cin * cout  # forward + 2 gradients
        reps = max(1, int(1e9 // flops))  # ~1 GFLOP per timing
        t = common.interleave(timers(side, cin, cout, k, stride, reps), rounds, settle=True)
        rows.append(
            {
                "conv (batch 32, NHWC)": name,
                "xla ms": 1e3 * t["xla"],
                "fast_conv ms": 1e3 * t["fast_conv"],
                "torch ms": 1e3 * t["torch"],
                "xla/fast_conv": t["xla"] / t["fast_conv"],
                "torch/fast_conv": t["torch"] / t["fast_conv"],
                "fast_conv GFLOP/s": flops / t["fast_conv"] / 1e9,
                "load": common.load_average(),
            }
        )
    columns = tuple(rows[0])
    print(common.table(rows, columns))
    return rows


if __name__ == "__main__":
    main()
