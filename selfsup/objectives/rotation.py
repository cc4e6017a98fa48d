"""Rotation prediction: Gidaris, Singh and Komodakis 2018, "Unsupervised Representation Learning
by Predicting Image Rotations" (RotNet).

Each image of the batch is shown at all four rotations (0, 90, 180 and 270 degrees
counter-clockwise) in the same mini-batch, which the paper found better than one random rotation
per image; a 4-way classifier on the backbone's pooled features predicts which, with the
cross-entropy averaged over the 4B rotated images.

Rotation comes after the spatial augmentation and before normalisation: the view spec must not
normalise (end it before `normalize`, e.g. "rrc(224)|flip"), and the objective normalises the
rotated images itself (`normalize`: "imagenet", "none", or a (mean, std) pair of numbers or
per-channel tuples, as the augment op). A per-channel normalisation commutes with rotation, so
the order only matters for clarity and for specs that would rotate normalised padding.

The rotated copies of one image sit next to each other in the batch (image b at rotation k is
row 4b + k): image-major, as the official data loader, which stacks each image's four rotations
and flattens [B, 4, ...] to [4B, ...]. Each device so keeps its own images.

Deviations from the official implementation (gidariss/FeatureLearningRotNet):
- Any backbone (a ResNet here) with a linear 4-way classifier on its pooled features, in place
  of the paper's NIN / AlexNet whose last layers form the rotation classifier.
- float32 or optional bf16 compute (`dtype`), the loss always in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfsup.augment import normalization
from selfsup.errors import UserError

NUM_ROTATIONS = 4


def rotate_batch(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """All four rotations of every image: [B, H, H, C] -> ([4B, H, H, C], labels int32 [4B]).

    Row 4b + k is image b rotated by k x 90 degrees counter-clockwise (`np.rot90(image, k)` on
    the spatial axes); its label is k.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise UserError(
            f"rotation: needs square images [B, H, H, C] (rotating changes H x W otherwise), got "
            f"shape {tuple(images.shape)}; crop the view to a square, e.g. rrc(224)"
        )
    b = images.shape[0]
    rotated = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)], axis=1)
    labels = jnp.tile(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), b)
    return rotated.reshape(b * NUM_ROTATIONS, *images.shape[1:]), labels


def rotation_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, accuracy) of logits [N, 4] against labels [N], in float32."""
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(axis=-1) == labels).mean()


def _normalizer(spec: Any):
    """augment's normalize op from "imagenet" / "none" / (mean, std)."""
    if isinstance(spec, str):
        return normalization.normalize(spec)
    if isinstance(spec, tuple | list) and len(spec) == 2:
        return normalization.normalize(
            tuple(spec[0]) if isinstance(spec[0], list) else spec[0],
            tuple(spec[1]) if isinstance(spec[1], list) else spec[1],
        )
    raise UserError(
        f"rotation: normalize must be 'imagenet', 'none' or a (mean, std) pair, got {spec!r}"
    )


class Objective(nn.Module):
    """Rotation prediction around any backbone: one square view [B, H, H, 3], not normalised."""

    backbone: nn.Module
    normalize: Any = "imagenet"  # applied after rotating; the view spec must not normalise
    dtype: Any = jnp.float32

    num_views = 1
    mutable = ("batch_stats",)
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        _normalizer(self.normalize)  # bad settings fail at build time
        super().__post_init__()

    @nn.compact
    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views (x,) [B, H, H, 3] -> (loss, {"loss", "rotation_acc"})."""
        if len(views) != 1:
            raise UserError(f"rotation: needs 1 view, got {len(views)}")
        images, labels = rotate_batch(views[0])
        images = _normalizer(self.normalize)(images, None)
        pooled = self.backbone(images, train=train).pooled
        logits = nn.Dense(NUM_ROTATIONS, dtype=self.dtype, name="head")(pooled)
        loss, accuracy = rotation_loss(logits, labels)
        return loss, {"loss": loss, "rotation_acc": accuracy}
