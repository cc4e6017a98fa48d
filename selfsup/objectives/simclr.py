"""SimCLRv2: Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners".

Two augmented views of each image go through the backbone and a 3-layer projection head; the
NT-Xent loss (SimCLR, Chen et al. 2020a) pulls each pair together against every other view in the
global batch. The loss is written on global arrays under jit: the negatives (2N - 2 per anchor)
and every BatchNorm statistic come from the whole global batch by construction (no shard_map, no
gathers), which is the official code's cross-replica concat and global BN.

The projection head (tf2 `ProjectionHead`, 'nonlinear', num_proj_layers=3): each layer is a
Dense without bias (init normal(0.01)) and a BatchNorm (momentum 0.9, eps 1e-5); the first two
have width = the backbone's pooled dim, a BN centre and a ReLU, the last has width `proj_dim`
(128) and a BN without centre and no ReLU. SimCLRv2 fine-tunes from the head's first layer
(tf2 `ft_proj_selector=1`): that layer is `params["head"]["layer_0"]` (+ its batch_stats), and
`Objective.encode` returns its output as `intermediates[FINETUNE_FEATURE]`; fine-tuning keeps it.

Deviations from the official implementation (google-research/simclr, tf2/):
- The loss is the mean over the 2N anchors; the official `add_contrastive_loss` returns the sum
  of the two views' means, twice this value, so its gradients are twice ours. Under LARS the
  factor changes the updates of BN parameters and biases (not trust-ratio adapted) and, for the
  adapted weights, the balance between gradient and weight decay.
- Both views run through the backbone as one batch of 2N (as the official code), interleaved
  (x1_0, x2_0, x1_1, ...) so that each device keeps its own samples: the BN statistics are those
  of the same 2N images.
- No MoCo-style memory buffer (the paper reports it adds ~1%; the official tf2 code has none) and
  no supervised head trained alongside (`lineareval_while_pretraining`): linear evaluation is
  done by `selfsup.evaluators`.
- Flax's BatchNorm keeps the biased batch variance in its running average.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Features
from selfsup.errors import UserError
from selfsup.ops import l2_normalize

# The head's first layer: kept by fine-tuning; its output is the fine-tuning input.
FINETUNE_LAYER = "head/layer_0"
FINETUNE_FEATURE = "head_layer_0"
BN_EPS = 1e-5
# tf.math.l2_normalize's default epsilon (1e-12 on the squared norm), which the official code
# uses: the norm is floored at 1e-6.
L2_EPS = 1e-6

head_init = nn.initializers.normal(0.01)


def nt_xent_logits(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
    """Cosine-similarity logits of the 2N views: z1, z2 [N, D] -> [2N, 2N] float32.

    Rows and columns are (z1_0 .. z1_{N-1}, z2_0 .. z2_{N-1}); entry (i, j) is
    cos(z_i, z_j) / temperature, with the diagonal (self-similarity) set to -inf.
    """
    z = l2_normalize(jnp.concatenate([z1, z2], axis=0).astype(jnp.float32), eps=L2_EPS)
    logits = z @ z.T / temperature
    return jnp.where(jnp.eye(z.shape[0], dtype=bool), -jnp.inf, logits)


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float = 0.1) -> jax.Array:
    """NT-Xent (normalised temperature-scaled cross-entropy): z1, z2 [N, D] -> scalar.

    For each of the 2N anchors i with positive p(i) (the other view of the same image):
    l_i = -log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) ), s = cosine similarity, over the
    2N - 1 other views (1 positive, 2N - 2 negatives); the loss is the mean of l_i over the 2N
    anchors. z1[i] and z2[i] are the two views of image i.
    """
    return _nt_xent(nt_xent_logits(z1, z2, temperature))


def _positives(two_n: int) -> jax.Array:
    """Column of each anchor's positive in `nt_xent_logits`: int32 [2N]."""
    return (jnp.arange(two_n) + two_n // 2) % two_n


def _nt_xent(logits: jax.Array) -> jax.Array:
    rows = jnp.arange(logits.shape[0])
    log_prob = logits[rows, _positives(logits.shape[0])] - jax.nn.logsumexp(logits, axis=1)
    return -log_prob.mean()


class HeadLayer(nn.Module):
    """Dense (no bias) -> BatchNorm (-> ReLU): [B, D_in] -> [B, features]."""

    features: int
    last: bool = False  # the last layer: BN without centre, no ReLU
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(
            self.features, use_bias=False, dtype=self.dtype, kernel_init=head_init, name="dense"
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPS,
            dtype=self.dtype,
            use_bias=not self.last,
            use_fast_variance=False,
            name="bn",
        )(x)
        return x if self.last else nn.relu(x)


class ProjectionHead(nn.Module):
    """SimCLRv2's projection head: [B, D] -> ([B, out_dim], each layer's output).

    `num_layers` HeadLayers named `layer_{i}`; hidden width = `hidden` or, when 0, the input
    width D; the last layer has `out_dim` features.
    """

    num_layers: int = 3
    hidden: int = 0
    out_dim: int = 128
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        hidden = self.hidden or x.shape[-1]
        outputs = []
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            width = self.out_dim if last else hidden
            layer = HeadLayer(width, last, self.bn_momentum, self.dtype, name=f"layer_{i}")
            x = layer(x, train=train)
            outputs.append(x)
        return x, tuple(outputs)


class Objective(nn.Module):
    """SimCLRv2 around any backbone: two views [B, H, W, 3] of equal shape."""

    backbone: nn.Module
    temperature: float = 0.1
    proj_layers: int = 3
    proj_hidden: int = 0  # 0: the backbone's pooled dim
    proj_dim: int = 128
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    num_views = 2
    mutable = ("batch_stats",)
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        if self.temperature <= 0:
            raise UserError(f"simclr: temperature must be > 0, got {self.temperature}")
        if self.proj_layers < 1 or self.proj_dim < 1 or self.proj_hidden < 0:
            raise UserError(
                "simclr: proj_layers and proj_dim must be >= 1 and proj_hidden >= 0 "
                f"(0 = backbone width), got {self.proj_layers}, {self.proj_dim}, "
                f"{self.proj_hidden}"
            )
        super().__post_init__()

    def setup(self):
        self.head = ProjectionHead(
            self.proj_layers, self.proj_hidden, self.proj_dim, self.bn_momentum, self.dtype
        )

    def embed(self, views: tuple[jax.Array, ...], train: bool) -> tuple[jax.Array, jax.Array]:
        """Both views through backbone and head as one batch: -> z1, z2 [B, proj_dim]."""
        if len(views) != 2 or views[0].shape != views[1].shape:
            raise UserError(
                "simclr: needs 2 views of the same shape (config.views with two specs of the "
                f"same size), got shapes {[tuple(v.shape) for v in views]}"
            )
        b = views[0].shape[0]
        # [B, 2, H, W, C] -> [2B, H, W, C]: each device's block holds both views of its samples.
        x = jnp.stack(views, axis=1).reshape(2 * b, *views[0].shape[1:])
        z, _ = self.head(self.backbone(x, train=train).pooled, train=train)
        z = z.reshape(b, 2, -1)
        return z[:, 0], z[:, 1]

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views (x1, x2) -> (NT-Xent loss, {"loss", "contrast_acc"})."""
        z1, z2 = self.embed(views, train)
        logits = nt_xent_logits(z1, z2, self.temperature)
        loss = _nt_xent(logits)
        accuracy = (logits.argmax(axis=1) == _positives(logits.shape[0])).mean()
        return loss, {"loss": loss, "contrast_acc": accuracy}

    def encode(self, images: jax.Array, *, train: bool = False) -> Features:
        """The backbone's Features, plus the head's first-layer output [B, D] as
        `intermediates[FINETUNE_FEATURE]` (the input of a classifier fine-tuned SimCLRv2-style)."""
        features = self.backbone(images, train=train)
        _, outputs = self.head(features.pooled, train=train)
        return features.replace(
            intermediates={**features.intermediates, FINETUNE_FEATURE: outputs[0]}
        )
