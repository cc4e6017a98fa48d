"""Barlow Twins: Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction".

Each of two views goes through the backbone and a projector (Linear without bias, BN, ReLU, twice,
then a Linear without bias: 8192-8192-8192 for ResNet-50). Each branch's embedding is
standardised over the batch, the cross-correlation matrix c = z1n^T z2n / N between the branches
is pushed to the identity: loss = sum_i (1 - c_ii)^2 + lambda * sum_{i != j} c_ij^2.

The loss is written on global arrays under jit, so the standardisation and c are over the whole
global batch, and the gradient is that of this loss on the global batch on any mesh.

Deviations from the official implementation (facebookresearch/barlowtwins, main.py):
- Gradients: the official code sums per-GPU cross-correlations with a raw
  `torch.distributed.all_reduce`, which autograd does not see, and DDP then averages the
  gradients over the GPUs; the gradient applied is the global loss's divided by the number of
  GPUs (the pattern of lightly#1977). Ours is the gradient of the loss itself. LARS's trust
  ratio cancels the factor for adapted weights; biases and BN parameters (not adapted) and the
  weight-decay balance see it.
- The standardisation is a pure function (biased variance, eps 1e-5: BatchNorm1d(affine=False)
  in training mode) without the running statistics that layer keeps and never uses.
- Each view runs through the backbone separately, as in the official code, so BatchNorm
  statistics are per view; their running averages are updated once per view.
- float32 or optional bf16 compute (`compute_dtype`), not fp16 autocast with loss scaling; the
  loss is always computed in float32.
- Flax's BatchNorm keeps the biased batch variance in its running average.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.errors import UserError
from selfsup.ops import torch_default_kernel_init

BN_EPS = 1e-5


def standardize(z: jax.Array, eps: float = BN_EPS) -> jax.Array:
    """Per-feature (z - mean) / sqrt(var + eps) over the batch, var biased: [N, D] -> [N, D]."""
    mean = z.mean(axis=0)
    var = jnp.mean(jnp.square(z - mean), axis=0)
    return (z - mean) * jax.lax.rsqrt(var + eps)


def cross_correlation(z1: jax.Array, z2: jax.Array) -> jax.Array:
    """c = standardize(z1)^T standardize(z2) / N: z1, z2 [N, D] -> [D, D] float32."""
    z1n = standardize(z1.astype(jnp.float32))
    z2n = standardize(z2.astype(jnp.float32))
    return z1n.T @ z2n / z1.shape[0]


def barlow_twins_terms(z1: jax.Array, z2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum_i (c_ii - 1)^2, sum_{i != j} c_ij^2) for z1, z2 [N, D]."""
    c = cross_correlation(z1, z2)
    diag = jnp.diagonal(c)
    on_diag = jnp.sum(jnp.square(diag - 1.0))
    off_diag = jnp.sum(jnp.square(jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c)))
    return on_diag, off_diag


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, lambd: float = 0.0051) -> jax.Array:
    """Barlow Twins loss: z1, z2 [N, D] (the two branches' embeddings) -> scalar.

    sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2, c = `cross_correlation(z1, z2)`.
    """
    on_diag, off_diag = barlow_twins_terms(z1, z2)
    return on_diag + lambd * off_diag


class Projector(nn.Module):
    """[B, D] -> [B, sizes[-1]]: (Linear no bias, BN, ReLU) for each of sizes[:-1], then a Linear
    without bias. Layers are `linear_{i}` and `bn_{i}`."""

    sizes: tuple[int, ...] = (8192, 8192, 8192)
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for i, width in enumerate(self.sizes):
            x = nn.Dense(
                width,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=torch_default_kernel_init,
                name=f"linear_{i}",
            )(x)
            if i < len(self.sizes) - 1:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=self.bn_momentum,
                    epsilon=BN_EPS,
                    dtype=self.dtype,
                    use_fast_variance=False,
                    name=f"bn_{i}",
                )(x)
                x = nn.relu(x)
        return x


class Objective(nn.Module):
    """Barlow Twins around any backbone: two views [B, H, W, 3] (sizes may differ)."""

    backbone: nn.Module
    projector: tuple[int, ...] = (8192, 8192, 8192)
    lambd: float = 0.0051
    bn_momentum: float = 0.9  # flax's convention: PyTorch's BatchNorm1d momentum 0.1
    dtype: Any = jnp.float32

    num_views = 2
    mutable = ("batch_stats",)
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        sizes = self.projector
        if (
            isinstance(sizes, str)
            or not sizes
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
        ):
            raise UserError(
                "barlow_twins: projector must be a non-empty tuple of positive layer widths, "
                f"e.g. (8192, 8192, 8192); got {sizes!r}"
            )
        if self.lambd < 0:
            raise UserError(f"barlow_twins: lambd must be >= 0, got {self.lambd}")
        super().__post_init__()

    def setup(self):
        self.head = Projector(tuple(self.projector), self.bn_momentum, self.dtype)

    def embed(self, images: jax.Array, train: bool) -> jax.Array:
        """One view [B, H, W, 3] -> projector output [B, projector[-1]]."""
        return self.head(self.backbone(images, train=train).pooled, train=train)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views (y1, y2) -> (loss, {"loss", "on_diag", "off_diag"})."""
        if len(views) != 2:
            raise UserError(f"barlow_twins: needs 2 views, got {len(views)}")
        z1 = self.embed(views[0], train)
        z2 = self.embed(views[1], train)
        on_diag, off_diag = barlow_twins_terms(z1, z2)
        loss = on_diag + self.lambd * off_diag
        return loss, {"loss": loss, "on_diag": on_diag, "off_diag": off_diag}
