"""The optimisers, one function each: `(cfg, Hyper) -> GradientTransformation` in `OPTIMIZERS`
(AdamW, SGD, the two LARS variants, LAMB); see the package docstring for their update rules.
`cfg` holds every key of `selfsup.config.defaults().optim` (`build` fills the missing ones).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfsup.optim.schedules import Schedule


class Hyper(NamedTuple):
    """What `build` resolves for an optimiser: schedules and masks (mask(params) -> bool tree)."""

    lr: Schedule
    weight_decay: float | Schedule  # a schedule when config.optim.weight_decay_end is set
    decay_mask: Callable[[Any], Any]  # True: weight-decayed
    adapt_mask: Callable[[Any], Any]  # True: trust-ratio adapted (LARS, LAMB)


def _adamw(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    return optax.adamw(
        hp.lr,
        b1=cfg["b1"],
        b2=cfg["b2"],
        eps=cfg["eps"],
        weight_decay=hp.weight_decay,
        mask=hp.decay_mask,
    )


def _sgd(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # L2 decay added to the gradient before momentum, as torch.optim.SGD's weight_decay.
    return optax.chain(
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        optax.sgd(hp.lr, momentum=cfg["momentum"], nesterov=False),
    )


def scale_by_trust_ratio(coefficient: float) -> optax.GradientTransformation:
    """u -> u * eta ||w|| / ||u|| per parameter array, 1 where either norm is 0.

    The values of `optax.scale_by_trust_ratio(trust_coefficient=eta)`, without its `safe_norm`:
    that takes each norm twice, the second of a full-size `where(norm <= 0, 1, x)` copy (there
    for gradients through the norm, which an update never takes): 75 ms of the 0.63 s SimCLR
    ResNet-50 step on 2 cores (BENCHMARKS.md, *LARS trust ratio*)."""

    def norm(x: jax.Array) -> jax.Array:
        return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))

    def scale(update: jax.Array, param: jax.Array) -> jax.Array:
        param_norm, update_norm = norm(param), norm(update)
        ratio = coefficient * param_norm / jnp.where(update_norm > 0, update_norm, 1.0)
        trust = jnp.where((param_norm > 0) & (update_norm > 0), ratio, 1.0)
        return update * trust.astype(update.dtype)

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("the trust ratio needs the parameters: tx.update(g, state, params)")
        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _trust_ratio(hp: Hyper, coefficient: float) -> optax.GradientTransformation:
    return optax.masked(scale_by_trust_ratio(coefficient), hp.adapt_mask)


def _lars_simclr(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # scale_by_learning_rate before trace: the LR enters the momentum buffer (v = m v + lr u).
    return optax.chain(
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        _trust_ratio(hp, cfg["trust_coefficient"]),
        optax.scale_by_learning_rate(hp.lr),
        optax.trace(decay=cfg["momentum"], nesterov=False),
    )


def _lars(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # trace before scale_by_learning_rate: the buffer holds trust-scaled steps, lr multiplies it.
    return optax.chain(
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        _trust_ratio(hp, cfg["trust_coefficient"]),
        optax.trace(decay=cfg["momentum"], nesterov=False),
        optax.scale_by_learning_rate(hp.lr),
    )


def _lamb(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # optax.lamb adapts every parameter; timm's Lamb (SparK) skips its no-decay group: the mask.
    return optax.chain(
        optax.scale_by_adam(b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"]),
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        _trust_ratio(hp, 1.0),
        optax.scale_by_learning_rate(hp.lr),
    )


OPTIMIZERS: dict[str, Callable[[dict, Hyper], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "lars_simclr": _lars_simclr,
    "lars": _lars,
    "lamb": _lamb,
}
