"""Attentive probe on frozen patch tokens, following AIM (El-Nouby et al. 2024; apple/ml-aim's
`AttentionPoolingClassifier`).

Input: the mean of the last 6 blocks' patch tokens (`features = "last_6_blocks"`), [B, N, D].
Head: a BatchNorm without affine parameters over the token features (eps 1e-6), then one
learned query q [D] attending to the tokens with multi-head cross-attention: keys x W_k and
values x W_v (no biases), per head h with head dim d = D / heads,
    a_h = softmax_n(q_h . k_{n,h} / sqrt(d)),   pooled_h = sum_n a_{h,n} v_{n,h},
heads concatenated to [B, D] (no output projection), then a linear classifier without bias.
Trained with AdamW and a cosine schedule on softmax cross-entropy; the learning-rate x weight-
decay grid, held-out selection and reporting are the linear probe's (`linear_probe.select_and_fit`).

Deviations from the official implementation: tokens are extracted once and cached (AIM trains
the probe with augmentation through the frozen trunk), so the token features must fit in host
memory; the BatchNorm uses the statistics of all fitting tokens (over images and tokens) instead
of per-batch statistics with running averages; the optimizer (AdamW), its defaults, the grid
and the held-out selection are ours, not taken from AIM. The default heads (0) are D / 64; AIM
uses the trunk's number of heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from selfsup.errors import UserError
from selfsup.evaluators import features as features_lib
from selfsup.evaluators import linear_probe
from selfsup.ops import torch_default_init


def defaults() -> mlc.ConfigDict:
    """The attentive probe's keys (beside the common ones in `selfsup.evaluators.COMMON`)."""
    return mlc.ConfigDict(
        {
            "features": "last_6_blocks",
            "num_heads": 0,  # 0: D / 64 when that divides D, else 1
            "learning_rates": (3e-4, 1e-3, 3e-3),
            "weight_decays": (0.05,),
            "epochs": 30,
            "warmup_epochs": 3,
            "probe_batch_size": 256,
            "momentum": 0.9,  # AdamW's b1
            "val_fraction": 0.1,
        }
    )


def attentive_pool(x: jax.Array, query: jax.Array, w_k: jax.Array, w_v: jax.Array, num_heads: int):
    """Multi-head attention pooling of tokens x [B, N, D] by one query [D] -> [B, D].

    w_k, w_v: [D, D] key and value projections (x @ w); heads split D into num_heads slices.
    """
    b, n, dim = x.shape
    d = dim // num_heads
    k = (x @ w_k).reshape(b, n, num_heads, d)
    v = (x @ w_v).reshape(b, n, num_heads, d)
    q = query.reshape(num_heads, d)
    logits = jnp.einsum("hd,bnhd->bhn", q, k) / jnp.sqrt(jnp.float32(d))
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhn,bnhd->bhd", weights, v).reshape(b, dim)


def head_apply(params: dict, x: jax.Array) -> jax.Array:
    """Standardised tokens [B, N, D] -> logits [B, C]."""
    num_heads = params["query"].shape[0]
    pooled = attentive_pool(x, params["query"].reshape(-1), params["k"], params["v"], num_heads)
    return pooled @ params["linear"]


def head_init(key: jax.Array, dim: int, num_classes: int, num_heads: int) -> dict:
    """AIM/PyTorch init: query normal(0, 0.02); linears uniform(+-1/sqrt(fan_in)).

    The query is stored as [heads, D / heads] so that `head_apply` reads the head count from it.
    """
    kq, kk, kv, kl = jax.random.split(key, 4)
    uniform = torch_default_init(dim)
    return {
        "query": 0.02 * jax.random.normal(kq, (num_heads, dim // num_heads), jnp.float32),
        "k": uniform(kk, (dim, dim)),
        "v": uniform(kv, (dim, dim)),
        "linear": uniform(kl, (dim, num_classes)),
    }


def default_heads(dim: int) -> int:
    heads = dim // 64
    return heads if heads >= 1 and dim % heads == 0 else 1


def probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    config: Any,
) -> dict[str, float]:
    """The whole protocol on cached tokens: train/test = (x [N, T, D], labels [N])."""
    x, xt = train[0], test[0]
    if x.ndim != 3:
        raise UserError(
            f"attentive_probe: feature '{config.features}' is one vector per image; use tokens "
            "(last_<k>_blocks, block_<i>, tokens, stage_<k>)"
        )
    dim = x.shape[2]
    heads = config.num_heads or default_heads(dim)
    if dim % heads:
        raise UserError(f"attentive_probe: num_heads={heads} does not divide the width {dim}")
    init = head_init(jax.random.key(config.seed), dim, num_classes, heads)
    return linear_probe.select_and_fit(
        head_apply,
        init,
        (x, train[1]),
        (xt, test[1]),
        norm_axes=(0, 1),
        learning_rates=config.learning_rates,
        weight_decays=config.weight_decays,
        optimizer="adamw",
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        batch_size=config.probe_batch_size,
        momentum=config.momentum,
        val_fraction=config.val_fraction,
        seed=config.seed,
    )


class Evaluator:
    """Attentive probe of `encode_fn`'s token feature `config.features`."""

    def __init__(self, encode_fn, config: Any, *, mesh: jax.sharding.Mesh):
        features_lib.check_name(config.features, "attentive_probe: config.features")
        if config.features in ("pooled", "cls", "avg"):
            raise UserError(
                f"attentive_probe: config.features='{config.features}' is one vector per image; "
                "use a token feature such as last_6_blocks"
            )
        if not 0 <= config.val_fraction < 1:
            raise UserError(
                f"attentive_probe: val_fraction must be in [0, 1), got {config.val_fraction}"
            )
        if config.epochs < 1 or not 0 <= config.warmup_epochs < config.epochs:
            raise UserError("attentive_probe: need epochs >= 1 and 0 <= warmup_epochs < epochs")
        self.encode_fn, self.config, self.mesh = encode_fn, config, mesh
        self.data: dict = {}  # per split: what run() read (features.describe)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        train, test, num_classes = features_lib.extract_splits(
            self.encode_fn, params, self.config, self.mesh, info=self.data
        )
        yield from probe(train, test, num_classes, self.config).items()
