"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, as DINO's
`eval_knn.py` runs it, Caron et al. 2021).

Train and test features are L2-normalised; each test image takes its k most cosine-similar
training images and each neighbour votes for its class with weight exp(similarity / T); the
class scores are the summed votes. Defaults k = 20, T = 0.07 (DINO). Reported: top-1 and top-5
of the scores on the test split, as fractions.

Deviations from the official implementation: none in the math. Similarities are computed in
float32 in chunks of test rows on one local device (DINO: on GPU, sharded over processes).
Ties between equal similarities are broken by `jax.lax.top_k` (lowest index first).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from selfsup.errors import UserError
from selfsup.evaluators import features as features_lib
from selfsup.ops import l2_normalize  # eps 1e-12, F.normalize's, as DINO's k-NN


def defaults() -> mlc.ConfigDict:
    """The k-NN evaluator's keys (beside the common ones in `selfsup.evaluators.COMMON`)."""
    return mlc.ConfigDict({"features": "pooled", "k": 20, "temperature": 0.07, "chunk": 256})


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "chunk"))
def knn_scores(
    train_x: jax.Array,
    train_y: jax.Array,
    test_x: jax.Array,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk: int = 256,
) -> jax.Array:
    """Class scores [M, C] of the test rows: sum over the k nearest training rows (cosine
    similarity s) of exp(s / temperature) on their class.

    train_x [N, D], train_y [N] int, test_x [M, D]; k is clipped to N.
    """
    train = l2_normalize(train_x.astype(jnp.float32))
    k = min(k, train.shape[0])
    m = test_x.shape[0]
    pad = -m % chunk
    test = l2_normalize(jnp.pad(test_x.astype(jnp.float32), ((0, pad), (0, 0))))

    def one_chunk(q: jax.Array) -> jax.Array:
        sims, idx = jax.lax.top_k(q @ train.T, k)  # [chunk, k]
        weights = jnp.exp(sims / temperature)
        votes = jax.nn.one_hot(train_y[idx], num_classes) * weights[..., None]
        return votes.sum(axis=1)  # [chunk, C]

    scores = jax.lax.map(one_chunk, test.reshape(-1, chunk, test.shape[1]))
    return scores.reshape(-1, num_classes)[:m]


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties: lower index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order == labels[:, None]).any(axis=1).mean())


def knn(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    config: Any,
) -> dict[str, float]:
    """The protocol on cached features ([N, D], or [N, T, D] averaged over tokens)."""
    x, xt = features_lib.pool(train[0]), features_lib.pool(test[0])
    scores = np.asarray(
        knn_scores(
            x,
            train[1],
            xt,
            k=config.k,
            temperature=config.temperature,
            num_classes=num_classes,
            chunk=config.chunk,
        )
    )
    # As DINO: top-5 reads only the first min(5, k) predictions (classes without votes tie at 0).
    top5 = topk_accuracy(scores, test[1], min(5, config.k))
    return {"top1": topk_accuracy(scores, test[1], 1), "top5": top5}


class Evaluator:
    """k-NN classification with `encode_fn`'s feature `config.features`."""

    def __init__(self, encode_fn, config: Any, *, mesh: jax.sharding.Mesh):
        features_lib.check_name(config.features, "knn: config.features")
        if config.k < 1 or config.temperature <= 0 or config.chunk < 1:
            raise UserError(
                f"knn: need k >= 1, temperature > 0 and chunk >= 1; got k={config.k}, "
                f"temperature={config.temperature}, chunk={config.chunk}"
            )
        self.encode_fn, self.config, self.mesh = encode_fn, config, mesh
        self.data: dict = {}  # per split: what run() read (features.describe)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        train, test, num_classes = features_lib.extract_splits(
            self.encode_fn, params, self.config, self.mesh, info=self.data
        )
        yield from knn(train, test, num_classes, self.config).items()
