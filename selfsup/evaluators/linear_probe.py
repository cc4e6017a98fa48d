"""Linear probe on frozen features, following MAE's protocol (He et al. 2022, appendix A.1).

A linear classifier on one feature per image (by name, see `features`), after a BatchNorm
without affine parameters (per-feature standardisation, eps 1e-6), trained with SGD (momentum
0.9) on softmax cross-entropy with a cosine learning rate after a linear warmup. A small grid of
(learning rate, weight decay) pairs is trained at once (vmapped); the pair with the best top-1 on
a deterministic held-out part of the training split (`val_fraction`) is retrained on the whole
training split and reported on the test split (top-1, top-5, as fractions).

Deviations from the official implementation: features are extracted once and cached, so the
head trains on the deterministic view (MAE trains it on RandomResizedCrop + flip views); the
standardisation uses the statistics of all fitting features (the limit of BatchNorm's running
averages) in training and test; SGD with coupled (L2) weight decay on the kernel replaces LARS;
learning rates are absolute (no batch-size scaling); MAE picks no hyperparameters on a held-out
split. The grid machinery (`fit`, `count_hits`, `select_and_fit`) also serves the attentive
probe.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from selfsup.errors import UserError
from selfsup.evaluators import features as features_lib

BN_EPS = 1e-6  # MAE's BatchNorm1d(affine=False, eps=1e-6)


def defaults() -> mlc.ConfigDict:
    """The linear probe's keys (beside the common ones in `selfsup.evaluators.COMMON`)."""
    return mlc.ConfigDict(
        {
            "features": "pooled",
            "batch_norm": True,
            "learning_rates": (0.01, 0.03, 0.1, 0.3),
            "weight_decays": (0.0, 1e-4),
            "epochs": 90,
            "warmup_epochs": 10,
            "probe_batch_size": 256,
            "momentum": 0.9,
            "val_fraction": 0.1,
        }
    )


# ---------------------------------------------------------------------------------------------
# The grid machinery (shared with the attentive probe).


def standardize(x: np.ndarray, reference: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-6) per feature, statistics of `reference` over `axes`."""
    ref = reference.astype(np.float64)
    mean, var = ref.mean(axis=axes), ref.var(axis=axes)
    return ((x - mean) / np.sqrt(var + BN_EPS)).astype(np.float32)


def warmup_cosine(lr: jax.Array, warmup: int, total: int) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup over `warmup` steps to `lr`, then cosine decay to 0 at step `total`."""

    def schedule(count: jax.Array) -> jax.Array:
        count = count.astype(jnp.float32)
        ramp = (count + 1) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / max(total - warmup, 1), 0.0, 1.0)
        return lr * jnp.where(count < warmup, ramp, 0.5 * (1 + jnp.cos(math.pi * progress)))

    return schedule


def _kernels_only(params: Any) -> Any:
    # Weight decay on weights only (matrices and the query), never on biases.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(name: str, lr, wd, momentum: float, warmup: int, total: int):
    """SGD with momentum and L2 decay (PyTorch's SGD semantics), or AdamW (decoupled decay)."""
    schedule = warmup_cosine(lr, warmup, total)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(wd, mask=_kernels_only),
            optax.sgd(schedule, momentum=momentum),
        )
    if name == "adamw":
        return optax.adamw(schedule, b1=momentum, b2=0.999, weight_decay=wd, mask=_kernels_only)
    raise UserError(f"probe optimizer must be 'sgd' or 'adamw', got {name!r}")


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "optimizer", "epochs", "warmup_epochs", "batch_size", "momentum"),
)
def fit(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    init_params: Any,
    x: jax.Array,
    y: jax.Array,
    lrs: jax.Array,
    wds: jax.Array,
    key: jax.Array,
    *,
    optimizer: str,
    epochs: int,
    warmup_epochs: int,
    batch_size: int,
    momentum: float,
) -> Any:
    """One head per (lrs[g], wds[g]), trained at once: params with a leading [G] axis.

    x: [N, ...] float32 features, y: [N] int32 labels; `apply_fn(params, x) -> logits [B, C]`.
    Every head sees the same minibatches: a fresh permutation of the N rows per epoch (from
    `key`), cut into N // batch_size batches (the remainder is dropped).
    """
    n = x.shape[0]
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch

    def loss_fn(params, xb, yb):
        logits = apply_fn(params, xb).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def train_one(lr, wd):
        tx = make_optimizer(optimizer, lr, wd, momentum, warmup_epochs * steps_per_epoch, total)

        def epoch(carry, e):
            order = jax.random.permutation(jax.random.fold_in(key, e), n)
            order = order[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)

            def step(carry, idx):
                params, opt_state = carry
                grads = jax.grad(loss_fn)(params, x[idx], y[idx])
                updates, opt_state = tx.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), None

            return jax.lax.scan(step, carry, order)[0], None

        carry = (init_params, tx.init(init_params))
        return jax.lax.scan(epoch, carry, jnp.arange(epochs))[0][0]

    return jax.vmap(train_one)(lrs, wds)


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks", "chunk"))
def count_hits(apply_fn, params, x, y, *, ks: tuple[int, ...], chunk: int = 256) -> jax.Array:
    """int32 [G, len(ks)]: rows of x whose label is among the top-k logits of head g.

    Ties count against the label unless it has the lowest index among them (as argmax), so a
    constant head scores chance, not 100%.
    """
    n = x.shape[0]
    pad = -n % chunk
    xs = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])
    ys = jnp.pad(y, (0, pad), constant_values=-1).reshape(-1, chunk)

    def one_chunk(total, xy):
        xc, yc = xy
        logits = jax.vmap(apply_fn, in_axes=(0, None))(params, xc)  # [G, chunk, C]
        true = jnp.take_along_axis(logits, jnp.maximum(yc, 0)[None, :, None], axis=2)
        classes = jnp.arange(logits.shape[2])
        ahead = (logits > true) | ((logits == true) & (classes < yc[None, :, None]))
        rank = ahead.sum(axis=2)  # [G, chunk]
        hits = jnp.stack([((rank < k) & (yc >= 0)).sum(axis=1) for k in ks], axis=1)
        return total + hits, None

    zeros = jnp.zeros((jax.tree.leaves(params)[0].shape[0], len(ks)), jnp.int32)
    return jax.lax.scan(one_chunk, zeros, (xs, ys))[0]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: a permutation of range(n) from `seed`, last `fraction` held
    out (at least one row each when fraction > 0)."""
    order = np.random.default_rng([seed, n]).permutation(n)
    held = min(max(1, round(fraction * n)), n - 1) if fraction > 0 else 0
    return np.sort(order[: n - held]), np.sort(order[n - held :])


def select_and_fit(
    apply_fn,
    init_params: Any,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    norm_axes: tuple[int, ...] | None,
    learning_rates,
    weight_decays,
    optimizer: str,
    epochs: int,
    warmup_epochs: int,
    batch_size: int,
    momentum: float,
    val_fraction: float,
    seed: int,
) -> dict[str, float]:
    """Grid search on a held-out part of `train`, refit of the best pair on all of `train`,
    top-1/top-5 on `test`. norm_axes: standardise over these axes (None: no standardisation).

    Returns top1, top5 (test), val_top1 (the best pair's held-out top-1; absent without a
    selection), lr and weight_decay (the chosen pair).
    """
    (x, y), (xt, yt) = train, test
    grid = [(float(lr), float(wd)) for lr in learning_rates for wd in weight_decays]
    if not grid:
        raise UserError("the probe needs at least one learning rate and one weight decay")
    key = jax.random.key(seed)
    common = dict(
        optimizer=optimizer, epochs=epochs, warmup_epochs=warmup_epochs, momentum=momentum
    )

    def norm(a: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return a if norm_axes is None else standardize(a, ref, norm_axes)

    def train_on(xs, ys, pairs):
        lrs, wds = (jnp.asarray(v, jnp.float32) for v in zip(*pairs, strict=True))
        b = min(batch_size, len(xs))
        return fit(apply_fn, init_params, xs, ys, lrs, wds, key, batch_size=b, **common)

    out: dict[str, float] = {}
    best = grid[0]
    if len(grid) > 1 and val_fraction > 0:
        fit_rows, val_rows = holdout_split(len(x), val_fraction, seed)
        ref = x[fit_rows]
        params = train_on(norm(ref, ref), y[fit_rows], grid)
        hits = np.asarray(
            count_hits(apply_fn, params, norm(x[val_rows], ref), y[val_rows], ks=(1,))
        )
        g = int(np.argmax(hits[:, 0]))  # the first grid pair among equals
        best = grid[g]
        out["val_top1"] = float(hits[g, 0]) / len(val_rows)
    params = train_on(norm(x, x), y, [best])
    hits = np.asarray(count_hits(apply_fn, params, norm(xt, x), yt, ks=(1, 5)))[0]
    out.update(top1=float(hits[0]) / len(yt), top5=float(hits[1]) / len(yt))
    out.update(lr=best[0], weight_decay=best[1])
    return out


# ---------------------------------------------------------------------------------------------
# The linear probe.


def linear_apply(params: dict, x: jax.Array) -> jax.Array:
    """[B, D] -> logits [B, C]."""
    return x @ params["kernel"] + params["bias"]


def linear_init(key: jax.Array, dim: int, num_classes: int) -> dict:
    """MAE's head init: weights normal(0, 0.01) (its trunc_normal cuts at +-2, i.e. 200 sigma),
    zero bias."""
    kernel = 0.01 * jax.random.normal(key, (dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    config: Any,
) -> dict[str, float]:
    """The whole protocol on cached features: train/test = (x [N, D] or [N, T, D], labels [N]);
    [N, T, D] features are averaged over tokens first. `config` holds `defaults()`' keys."""
    x, xt = features_lib.pool(train[0]), features_lib.pool(test[0])
    init = linear_init(jax.random.key(config.seed), x.shape[1], num_classes)
    return select_and_fit(
        linear_apply,
        init,
        (x, train[1]),
        (xt, test[1]),
        norm_axes=(0,) if config.batch_norm else None,
        learning_rates=config.learning_rates,
        weight_decays=config.weight_decays,
        optimizer="sgd",
        epochs=config.epochs,
        warmup_epochs=config.warmup_epochs,
        batch_size=config.probe_batch_size,
        momentum=config.momentum,
        val_fraction=config.val_fraction,
        seed=config.seed,
    )


class Evaluator:
    """Linear probe of `encode_fn`'s feature `config.features` on `config`'s data (see
    `selfsup.evaluators` for the common keys)."""

    def __init__(self, encode_fn, config: Any, *, mesh: jax.sharding.Mesh):
        features_lib.check_name(config.features, "linear_probe: config.features")
        if not 0 <= config.val_fraction < 1:
            raise UserError(
                f"linear_probe: val_fraction must be in [0, 1), got {config.val_fraction}"
            )
        if config.epochs < 1 or not 0 <= config.warmup_epochs < config.epochs:
            raise UserError("linear_probe: need epochs >= 1 and 0 <= warmup_epochs < epochs")
        self.encode_fn, self.config, self.mesh = encode_fn, config, mesh
        self.data: dict = {}  # per split: what run() read (features.describe)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        train, test, num_classes = features_lib.extract_splits(
            self.encode_fn, params, self.config, self.mesh, info=self.data
        )
        yield from probe(train, test, num_classes, self.config).items()
