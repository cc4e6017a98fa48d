"""Layer blocks, forward + backward: Linen's form against the library's, PyTorch's beside them.

Explains two steps in the throughput table. Each row times `jax.grad` of sum(block(x) * g) with
respect to the input and the weights, in three forms interleaved in one process:

- ViT MLP (LayerNorm -> fc1 -> exact GELU -> fc2, residual) on MAE ViT-B/16's encoder tokens
  [16, 13, 768] and decoder tokens [16, 50, 512]: Linen's `nn.Dense` (one dot over [B, T, D]),
  `jax.nn.gelu` and an autodiff LayerNorm against the library's `selfsup.ops.Dense` (the same
  dot on [B * T, D]), `selfsup.ops.gelu` and `selfsup.ops.layer_norm`;
- ResNet-50's 1x1 conv + BatchNorm (batch statistics) + ReLU at 64 px, batch 32: the conv as a
  [B, H, W, C] @ [C, O] matmul and an autodiff BatchNorm and ReLU against
  `selfsup.ops.matmul` (on [B * H * W, C]) and `selfsup.ops.BatchNorm(relu=True)`;
- the ResNet stem's 3x3/2 max-pool after a ReLU: `nn.max_pool` against
  `selfsup.ops.max_pool`.

    python benchmarks/layers.py [--quick]
"""

from __future__ import annotations

import time
from collections.abc import Callable

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from selfsup.ops import BatchNorm, gelu, layer_norm, matmul, max_pool

# name: (kind, input shape [NHWC or BTD], width: MLP hidden or conv output channels)
BLOCKS = {
    "MAE enc MLP [16,13,768] 4x": ("mlp", (16, 13, 768), 3072),
    "MAE dec MLP [16,50,512] 4x": ("mlp", (16, 50, 512), 2048),
    "R50 1x1+BN+ReLU 64->256 @16": ("conv", (32, 16, 16, 64), 256),
    "R50 1x1+BN+ReLU 128->512 @8": ("conv", (32, 8, 8, 128), 512),
    "R50 1x1+BN+ReLU 256->64 @16": ("conv", (32, 16, 16, 256), 64),
    "R50 stem ReLU+maxpool 3x3/2 @32": ("pool", (32, 32, 32, 64), 64),
}


def _layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def _batch_norm(x):
    mean = x.mean((0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean((0, 1, 2)) + 1e-5)


def jax_blocks(kind: str) -> dict[str, Callable]:
    """{"linen": f, "selfsup": f}, each f(x, *weights) -> the block's output."""
    if kind == "mlp":

        def mlp(dot, norm, act):
            return lambda x, w1, w2: x + dot(act(dot(norm(x), w1)), w2)

        def linen_dot(x, w):  # what nn.Dense calls: one dot contracting [B, T, D]'s last axis
            return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))

        def selfsup_norm(x):  # no affine, as the other two forms
            c = x.shape[-1]
            return layer_norm(x, jnp.ones(c), jnp.zeros(c), 1e-6)

        return {
            "linen": mlp(linen_dot, _layer_norm, lambda h: nn.gelu(h, approximate=False)),
            "selfsup": mlp(matmul, selfsup_norm, gelu),
        }
    if kind == "conv":

        def selfsup_bn_relu(y):  # scale 1, bias 0: no affine, as the other two forms
            c = y.shape[-1]
            variables = {
                "params": {"scale": jnp.ones(c), "bias": jnp.zeros(c)},
                "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)},
            }
            return BatchNorm(relu=True).apply(variables, y, mutable=["batch_stats"])[0]

        return {
            "linen": lambda x, w: jax.nn.relu(_batch_norm(jnp.matmul(x, w))),
            "selfsup": lambda x, w: selfsup_bn_relu(matmul(x, w)),
        }

    def pool(fn):
        return lambda x: fn(jax.nn.relu(x))

    return {
        "linen": pool(lambda x: nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))),
        "selfsup": pool(lambda x: max_pool(x, 3, 2, 1)),
    }


def torch_block(kind: str, width: int, channels: int) -> Callable:
    if kind == "mlp":
        norm, fc1, fc2 = (
            torch.nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6),
            torch.nn.Linear(channels, width, bias=False),
            torch.nn.Linear(width, channels, bias=False),
        )
        return lambda x: x + fc2(torch.nn.functional.gelu(fc1(norm(x))))
    if kind == "conv":
        conv = torch.nn.Conv2d(channels, width, 1, bias=False)
        norm = torch.nn.BatchNorm2d(width, affine=False)
        return lambda x: torch.relu(norm(conv(x)))
    return lambda x: torch.nn.functional.max_pool2d(torch.relu(x), 3, 2, 1)


def timers(kind: str, shape: tuple, width: int, reps: int) -> dict:
    """{"linen": fn, "selfsup": fn, "torch": fn}: each returns seconds per forward + backward."""
    rng = np.random.default_rng(0)
    channels = shape[-1]
    x = rng.standard_normal(shape, np.float32)
    weights = {
        "mlp": [(channels, width), (width, channels)],
        "conv": [(channels, width)],
        "pool": [],
    }[kind]
    ws = [jnp.asarray(rng.standard_normal(s, np.float32) / np.sqrt(s[0])) for s in weights]
    jx = jnp.asarray(x)
    out = {}
    for name, block in jax_blocks(kind).items():
        g = jnp.asarray(rng.standard_normal(jax.eval_shape(block, jx, *ws).shape, np.float32))
        fn = jax.jit(
            jax.grad(lambda *a, block=block, g=g: jnp.sum(block(*a) * g), range(1 + len(ws)))
        )
        jax.block_until_ready(fn(jx, *ws))

        def once(fn=fn) -> float:
            start = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(fn(jx, *ws))
            return (time.perf_counter() - start) / reps

        out[name] = once
    block = torch_block(kind, width, channels)
    nchw = x if kind == "mlp" else x.transpose(0, 3, 1, 2).copy()
    tx = torch.from_numpy(nchw).requires_grad_()
    tg = torch.from_numpy(rng.standard_normal(tuple(block(tx).shape), np.float32))

    def time_torch() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            tx.grad = None
            block(tx).backward(tg)
        return (time.perf_counter() - start) / reps

    out["torch"] = time_torch
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    rounds = common.kernel_rounds(argv, __doc__)
    rows = []
    for name, (kind, shape, width) in BLOCKS.items():
        t = common.interleave(timers(kind, shape, width, reps=10), rounds, settle=True)
        rows.append(
            {
                "block (forward + backward)": name,
                "linen ms": 1e3 * t["linen"],
                "selfsup ms": 1e3 * t["selfsup"],
                "torch ms": 1e3 * t["torch"],
                "linen/selfsup": t["linen"] / t["selfsup"],
                "torch/selfsup": t["torch"] / t["selfsup"],
                "load": common.load_average(),
            }
        )
    print(common.table(rows, tuple(rows[0])))
    return rows


if __name__ == "__main__":
    main()
