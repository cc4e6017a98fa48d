"""SwAV: Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments".

Every crop (multi-crop: 2 global + 6 local) goes through the backbone, a projection head
(Linear, BN, ReLU, Linear: 2048-2048-128 for ResNet-50) and an L2 normalisation, then is scored
against K prototypes (3000, a Linear without bias whose rows are unit vectors). For each assigned
crop (the global ones) the Sinkhorn-Knopp algorithm turns its scores into soft codes whose
prototype marginals are equal over the global batch; every other crop predicts those codes with a
softmax at temperature 0.1 (swapped prediction). Small batches add a queue of past embeddings to
the Sinkhorn input so that B + queue samples share the K prototypes.

The loss is written on global arrays under jit: Sinkhorn's sums run over the whole global batch
(the official code's all_reduce) and BatchNorm is synchronised (the official `sync_bn`).

Deviations from the official implementation (facebookresearch/swav, main_swav.py, src/resnet50.py):
- Prototypes are normalised in the forward pass (w / ||w|| per prototype) instead of in place
  before each step. The forward values are identical; the gradient reaching the stored weights is
  the official gradient with its radial part removed and divided by ||w||, so a step moves the
  normalised prototypes the same way to first order in the learning rate while ||w|| stays near 1
  (the radial part is what the official renormalisation discards). The optimiser sees the stored
  weights, so weight decay and LARS' trust ratio act on ||w|| rather than on 1.
- Freezing the prototypes for the first iterations (`freeze_prototypes_niters`) is the optimiser's
  `frozen_until` rule (selfsup.optim): no update and no optimiser-state change, as a parameter
  whose .grad is None.
- One global queue of `queue_length` embeddings per assigned crop (the official per-GPU queues of
  queue_length / world_size, which its Sinkhorn sums over all GPUs, together). It fills from
  training step `queue_start_step` (the official epoch_queue_starts x iterations per epoch) and
  is used once full (the official "last row non-zero" test); a step counter in the "queue"
  collection tracks this, so it is checkpointed and resumes exactly.
- Sinkhorn subtracts the global maximum score before the exponential (the result is unchanged:
  the first step divides by the total) so that small epsilons cannot overflow.
- Crops of equal size run through the backbone together (the official grouping by resolution), each
  device keeping its own images (interleaved batch); the head sees all crops as one batch.
- float32 or bf16 compute (`dtype`), not fp16 autocast; Sinkhorn and the loss are float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.errors import UserError
from selfsup.ops import l2_normalize, torch_default_init, torch_default_kernel_init

BN_EPS = 1e-5


def sinkhorn(scores: jax.Array, epsilon: float = 0.05, iterations: int = 3) -> jax.Array:
    """Soft codes of scores [N, K] -> [N, K] float32, rows summing to 1, no gradient.

    Q = exp(scores / epsilon), normalised to sum 1, then `iterations` rounds of: each prototype
    (column) to total 1/K, each sample (row) to total 1/N; finally scaled by N. The columns of the
    result sum to about N/K (exactly after infinitely many rounds).
    """
    s = jax.lax.stop_gradient(scores).astype(jnp.float32)
    n, k = s.shape
    q = jnp.exp((s - s.max()) / epsilon)
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=0, keepdims=True) / k
        q = q / q.sum(axis=1, keepdims=True) / n
    return q * n


def swapped_prediction_loss(
    scores: jax.Array, codes: jax.Array, assign: Sequence[int], temperature: float = 0.1
) -> jax.Array:
    """SwAV's loss: scores [V, B, K] (every crop), codes [A, B, K] (of crops `assign`) -> scalar.

    For each assigned crop a: the mean over the other V - 1 crops v of
    -mean_b sum_k codes[a, b, k] log softmax(scores[v, b] / temperature)_k; then the mean over a.
    """
    logp = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
    views = scores.shape[0]
    total = 0.0
    for a, crop in enumerate(assign):
        ce = -jnp.sum(codes[a][None] * logp, axis=-1).mean(axis=-1)  # [V]
        total = total + (ce.sum() - ce[crop]) / (views - 1)
    return total / len(assign)


class Head(nn.Module):
    """[B, D] -> [B, out_dim] L2-normalised: Linear(hidden), BN, ReLU, Linear(out_dim)."""

    hidden: int = 0  # 0: the input width
    out_dim: int = 128
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        hidden = self.hidden or x.shape[-1]
        dense = dict(dtype=self.dtype, kernel_init=torch_default_kernel_init)
        x = nn.Dense(hidden, bias_init=torch_default_init(x.shape[-1]), name="linear_0", **dense)(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPS,
            dtype=self.dtype,
            use_fast_variance=False,
            name="bn_0",
        )(x)
        x = nn.relu(x)
        bias_init = torch_default_init(hidden)
        x = nn.Dense(self.out_dim, bias_init=bias_init, name="linear_1", **dense)(x)
        return l2_normalize(x.astype(jnp.float32))


class Objective(nn.Module):
    """SwAV around any backbone: multi-crop views, the assigned (global) crops first."""

    backbone: nn.Module
    num_views: int = 8  # 2 global + 6 local crops; must equal len(config.views)
    crops_for_assign: tuple[int, ...] = (0, 1)
    num_prototypes: int = 3000
    proj_hidden: int = 0  # 0: the backbone's pooled width (2048 for ResNet-50)
    proj_dim: int = 128
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    queue_length: int = 0  # 0: no queue
    queue_start_step: int = 0
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    mutable = ("batch_stats", "queue")
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        assign = tuple(self.crops_for_assign)
        if self.num_views < 2 or not assign or not all(0 <= a < self.num_views for a in assign):
            raise UserError(
                f"swav: needs num_views >= 2 and crops_for_assign within 0..{self.num_views - 1}, "
                f"got num_views={self.num_views}, crops_for_assign={self.crops_for_assign!r}"
            )
        for key in ("num_prototypes", "proj_dim", "sinkhorn_iterations"):
            if getattr(self, key) < 1:
                raise UserError(f"swav: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "epsilon"):
            if getattr(self, key) <= 0:
                raise UserError(f"swav: {key} must be > 0, got {getattr(self, key)}")
        if self.queue_length < 0 or self.queue_start_step < 0 or self.proj_hidden < 0:
            raise UserError(
                "swav: queue_length, queue_start_step and proj_hidden must be >= 0, got "
                f"{self.queue_length}, {self.queue_start_step}, {self.proj_hidden}"
            )
        super().__post_init__()

    def setup(self):
        self.head = Head(self.proj_hidden, self.proj_dim, self.bn_momentum, self.dtype)
        # [proj_dim, K]: the official Linear(proj_dim, K, bias=False) weight, transposed.
        self.prototypes = self.param(
            "prototypes",
            torch_default_kernel_init,
            (self.proj_dim, self.num_prototypes),
            jnp.float32,
        )
        if self.queue_length:
            shape = (len(self.crops_for_assign), self.queue_length, self.proj_dim)
            self.queue = self.variable("queue", "embeddings", jnp.zeros, shape, jnp.float32)
            self.queue_steps = self.variable("queue", "steps", jnp.zeros, (), jnp.int32)

    def embed(self, views: Sequence[jax.Array], train: bool) -> jax.Array:
        """Crops -> normalised embeddings [V, B, proj_dim] float32; equal sizes batched together."""
        b = views[0].shape[0]
        pooled, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape == views[i].shape:
                j += 1
            # [B, n, H, W, C] -> [B n, H, W, C]: each device keeps its own samples' crops.
            x = jnp.stack(views[i:j], axis=1).reshape(b * (j - i), *views[i].shape[1:])
            pooled.append(self.backbone(x, train=train).pooled.reshape(b, j - i, -1))
            i = j
        feats = jnp.concatenate(pooled, axis=1)  # [B, V, D]
        z = self.head(feats.reshape(b * len(views), -1), train=train)
        return z.reshape(b, len(views), -1).transpose(1, 0, 2)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views (crops [B, H_v, W_v, 3]) -> (loss, {"loss", "queue_used"})."""
        if len(views) != self.num_views:
            raise UserError(
                f"swav: objective.num_views={self.num_views} but got {len(views)} views; make "
                "them equal (config.views, e.g. augment.multi_crop(global, local, 2, 6))"
            )
        z = self.embed(views, train)  # [V, B, d]
        w = l2_normalize(self.prototypes, axis=0)  # unit prototypes, [d, K]
        scores = jnp.einsum("vbd,dk->vbk", z.astype(self.dtype), w.astype(self.dtype))
        b = z.shape[1]
        codes, used = [], jnp.zeros((), bool)
        if self.queue_length:
            steps = self.queue_steps.value
            pushed = jnp.maximum(steps - self.queue_start_step, 0)
            used = pushed * b >= self.queue_length
        for a, crop in enumerate(self.crops_for_assign):
            out = scores[crop]
            if not self.queue_length:
                codes.append(sinkhorn(out, self.epsilon, self.sinkhorn_iterations))
                continue
            queue = self.queue.value[a]
            with_queue = jnp.concatenate([queue.astype(self.dtype) @ w.astype(self.dtype), out])
            codes.append(
                jax.lax.cond(
                    used,
                    lambda s: sinkhorn(s, self.epsilon, self.sinkhorn_iterations)[-b:],
                    lambda s: sinkhorn(s[-b:], self.epsilon, self.sinkhorn_iterations),
                    with_queue,
                )
            )
        if self.queue_length and train and not self.is_initializing():
            self._push(jax.lax.stop_gradient(z))
        loss = swapped_prediction_loss(
            scores, jnp.stack(codes), self.crops_for_assign, self.temperature
        )
        return loss, {"loss": loss, "queue_used": used.astype(jnp.float32)}

    def _push(self, z: jax.Array) -> None:
        """Newest embeddings of the assigned crops to the queue's front, once it has started."""
        steps = self.queue_steps.value
        new = z[jnp.asarray(self.crops_for_assign)].astype(jnp.float32)  # [A, B, d]
        rolled = jnp.concatenate([new, self.queue.value], axis=1)[:, : self.queue_length]
        started = steps >= self.queue_start_step
        self.queue.value = jnp.where(started, rolled, self.queue.value)
        self.queue_steps.value = steps + 1
