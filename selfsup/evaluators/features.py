"""Frozen features for the evaluators: pick a feature by name, extract it once under jit.

A feature name says which output of a backbone an evaluator reads:

  pooled           [B, D]     `Features.pooled` (the cls token, or the mean of the tokens)
  cls              [B, D]     `Features.cls` (ViTs with a cls token)
  avg              [B, D]     mean of the final (normed) patch tokens, or of a convnet's last map
  tokens           [B, N, D]  the final patch tokens, or a convnet's last map as H*W tokens
  block_<i>        [B, N, D]  the patch tokens after block i (`intermediates["block_i"]`, the
                              prefix tokens such as cls dropped)
  stage_<k>        [B, N, C]  a convnet's stage k (1-based; strides 4, 8, 16, 32) as H*W tokens
  last_<k>_blocks  [B, N, D]  the mean of the last k blocks' patch tokens (AIM's probe input)

Evaluators that need one vector per image average the tokens of a [B, N, D] feature (`pool`), so
"block_5" in a linear probe is the average of that block's patch tokens, "stage_4" a ResNet's
pooled last stage.

Extraction runs the view spec (deterministic preprocessing such as
"resize(37, method='bicubic')|center_crop(32)|normalize('imagenet')", `selfsup.augment`) and the
frozen `encode_fn(params, images) -> Features` under one jit, with the batch split over the
mesh's batch axes as in training; the features come back to the host as float32 NumPy arrays.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import augment, data
from selfsup.backbones import Features
from selfsup.errors import UserError
from selfsup.parallel import sharding

EncodeFn = Callable[[Any, jax.Array], Features]

_NAME = re.compile(r"pooled|cls|avg|tokens|block_\d+|stage_[1-9]\d*|last_[1-9]\d*_blocks")
NAMES = "pooled, cls, avg, tokens, block_<i>, stage_<k>, last_<k>_blocks"


def check_name(name: Any, where: str) -> str:
    """`name` if it is a valid feature name, else a UserError naming the valid ones."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UserError(f"{where}: unknown feature {name!r}; use one of {NAMES}")
    return name


def _as_tokens(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H*W, C]; [B, N, D] as is."""
    return x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 4 else x


def _block(features: Features, i: int) -> jax.Array:
    """Patch tokens [B, N, D] after block i (prefix tokens dropped)."""
    key = f"block_{i}"
    if key not in features.intermediates:
        blocks = ", ".join(sorted(k for k in features.intermediates if k.startswith("block_")))
        raise UserError(
            f"feature '{key}': the backbone has no such block (it has: {blocks or 'none'})"
        )
    x = _as_tokens(features.intermediates[key])
    if features.tokens is not None and x.ndim == 3:
        x = x[:, x.shape[1] - features.tokens.shape[1] :]  # the prefix (cls) comes first
    return x


def _num_blocks(features: Features) -> int:
    indices = [int(k[6:]) for k in features.intermediates if re.fullmatch(r"block_\d+", k)]
    return max(indices) + 1 if indices else 0


def _stage(features: Features, k: int) -> jax.Array:
    key = f"stage_{k}"
    if key in features.intermediates:
        return _as_tokens(features.intermediates[key])
    if k <= len(features.feature_maps):
        return _as_tokens(features.feature_maps[k - 1])
    raise UserError(
        f"feature '{key}': the backbone has {len(features.feature_maps)} stages; use a convnet "
        "backbone (ResNet, ConvNeXt) or a ViT feature such as block_<i>"
    )


def _last_map(features: Features) -> jax.Array:
    if features.tokens is not None:
        return features.tokens
    if features.feature_maps:
        return _as_tokens(features.feature_maps[-1])
    raise UserError("feature 'tokens'/'avg': the backbone returns neither tokens nor feature maps")


def select(features: Features, name: str) -> jax.Array:
    """The feature `name` of a batch (see the module docstring): [B, D] or [B, N, D]."""
    check_name(name, "features")
    if name == "pooled":
        return features.pooled
    if name == "cls":
        if features.cls is None:
            raise UserError("feature 'cls': the backbone has no cls token; use 'pooled' or 'avg'")
        return features.cls
    if name == "avg":
        return _last_map(features).mean(axis=1)
    if name == "tokens":
        return _last_map(features)
    if name.startswith("block_"):
        return _block(features, int(name[6:]))
    if name.startswith("stage_"):
        return _stage(features, int(name[6:]))
    k = int(name.split("_")[1])
    depth = _num_blocks(features)
    if k > depth:
        raise UserError(
            f"feature '{name}': the backbone has {depth} blocks; use last_<k>_blocks with k <= "
            f"{depth}"
        )
    return jnp.mean(jnp.stack([_block(features, i) for i in range(depth - k, depth)]), axis=0)


def pool(x: np.ndarray | jax.Array):
    """[B, D] as is; [B, N, D] -> mean over the tokens [B, D]."""
    return x if x.ndim == 2 else x.mean(axis=1)


# ---------------------------------------------------------------------------------------------
# Data.


class Subset:
    """The examples `indices` (sorted) of a Source, itself a Source."""

    def __init__(self, source: data.Source, indices: np.ndarray):
        self.source, self.indices = source, np.sort(np.asarray(indices, np.int64))
        self.num_classes, self.image_size = source.num_classes, source.image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.source[int(self.indices[i])]


def load_split(data_config: Any, split: str, limit: int, seed: int) -> data.Source:
    """One split of `data_config`; with limit > 0, a random subset of `limit` examples that is a
    function of `seed` alone (so every run and every host reads the same images)."""
    source = data.build_source(data_config, split)
    if len(source) == 0:
        raise UserError(f"split {split!r} of the evaluation data is empty; pick another split")
    if 0 < limit < len(source):
        rng = np.random.default_rng([seed, len(source)])
        return Subset(source, rng.choice(len(source), limit, replace=False))
    return source


# ---------------------------------------------------------------------------------------------
# Extraction.


@functools.lru_cache(maxsize=64)
def view_fn(spec: str) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    """The compiled view spec; cached so that equal specs give the same function (jit cache)."""
    return augment.build([spec])


@functools.partial(jax.jit, static_argnames=("encode_fn", "view", "feature", "mesh"))
def _extract_batch(params, images, labels, valid, *, encode_fn, view, feature, mesh):
    (x,) = view_fn(view)(images, jax.random.key(0))  # deterministic ops ignore the key
    out = select(encode_fn(params, x), feature).astype(jnp.float32)
    everywhere = sharding.replicated(mesh)  # every host reads all rows back
    return tuple(jax.lax.with_sharding_constraint(a, everywhere) for a in (out, labels, valid))


def extract(
    encode_fn: EncodeFn,
    params: Any,
    source: data.Source,
    *,
    view: str,
    feature: str,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    max_gb: float = 16.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, D] or [N, T, D], labels int32 [N]) of every decodable example.

    One ordered pass (`data.eval_batches`); each process loads its rows of the global batch.
    Pass the same `encode_fn` object each time: it keys the jit cache. Raises UserError when
    the features would take more than `max_gb` of host memory.
    """
    if batch_size % mesh.size or batch_size % jax.process_count():
        raise UserError(
            f"evaluator batch_size={batch_size} must be divisible by the {mesh.size} devices"
        )
    view_fn(view)  # spec errors surface here, as UserErrors
    batches = data.eval_batches(
        source,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    in_sharding = sharding.batch_sharding(mesh)
    static = dict(encode_fn=encode_fn, view=view, feature=feature, mesh=mesh)
    outs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    pending = None

    def fetch(result) -> None:
        feats, labs, valid = (np.asarray(a) for a in result)
        if not outs:
            gb = len(source) * math.prod(feats.shape[1:]) * 4 / 1e9
            if gb > max_gb:
                raise UserError(
                    f"feature '{feature}' of {len(source)} images takes {gb:.1f} GB; set "
                    "config.train_limit / test_limit lower or raise config.max_feature_gb"
                )
        outs.append(feats[valid])
        labels.append(labs[valid])

    try:
        for batch in batches:
            arrays = [
                jax.make_array_from_process_local_data(in_sharding, batch[k])
                for k in ("image", "label", "valid")
            ]
            result = _extract_batch(params, *arrays, **static)
            if pending is not None:  # fetch the previous batch while this one runs
                fetch(pending)
            pending = result
        if pending is not None:
            fetch(pending)
    finally:
        batches.close()
    if not outs or sum(len(o) for o in outs) == 0:
        raise UserError("no image of the evaluation split decodes; check config.data")
    return np.concatenate(outs), np.concatenate(labels).astype(np.int32)


def extract_splits(
    encode_fn: EncodeFn,
    params: Any,
    config: Any,
    mesh: jax.sharding.Mesh,
    info: dict | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], int]:
    """((train features, labels), (test features, labels), num_classes) for an evaluator's
    config: its `data`, `train_split`/`test_split`, `*_limit`, `seed`, `view`, `features`,
    `batch_size` and `max_feature_gb` (see `selfsup.evaluators`).

    `info`, when given, receives {"train": ..., "test": ...}, each `describe(...)`'s record."""
    out = []
    for role, split, limit in (
        ("train", config.train_split, config.train_limit),
        ("test", config.test_split, config.test_limit),
    ):
        source = load_split(config.data, split, limit, config.seed)
        feats, labels = extract(
            encode_fn,
            params,
            source,
            view=config.view,
            feature=config.features,
            mesh=mesh,
            batch_size=config.batch_size,
            max_gb=config.max_feature_gb,
        )
        out.append((feats, labels))
        if info is not None:
            info[role] = describe(source, split, labels)
    return out[0], out[1], source.num_classes


def describe(source: data.Source, split: str, labels: np.ndarray) -> dict:
    """What an evaluation read from one split: {"split": its name, "source": which images (a
    held-out part, for sources without a test split), "images": decodable images used,
    "split_images": images in the split, "classes": the dataset's classes, "classes_present":
    classes among the images used}."""
    full = source.source if isinstance(source, Subset) else source
    text = getattr(full, "description", f"split {split!r}")
    if isinstance(source, Subset):
        text += f"; a fixed random subset of {len(source)}"
    return {
        "split": split,
        "source": text,
        "images": int(len(labels)),
        "split_images": int(len(full)),
        "classes": int(source.num_classes),
        "classes_present": int(len(np.unique(labels))),
    }
