"""Optax chains from `config.optim`: schedule, batch-size LR scaling, and parameter masks.

Parameter subsets are addressed by regexes over '/'-joined key paths
("backbone/blocks_0/attn/qkv/kernel"), matched with `re.fullmatch`, first match winning:
`no_decay` (no weight decay), `frozen` (zero updates, no optimiser state, outside the clipping
norm) and `lr_mults` (per-parameter LR multipliers). The chain for trainable parameters is
clip-by-global-norm -> optimiser (its LR from the schedule) -> LR multipliers.

An optimiser is one function `(cfg, schedule, decay_mask) -> GradientTransformation` in
`OPTIMIZERS`, so LARS and LAMB slot in beside AdamW and SGD.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from selfsup.errors import UserError

Schedule = Callable[[Any], jax.Array]

DEFAULT_NO_DECAY = (r".*/bias$", r".*/scale$", r".*(pos_embed|cls_token|mask_token).*")
SCHEDULES = ("cosine", "constant")


def param_paths(params: Any) -> list[str]:
    """'/'-joined key paths of the leaves of `params`, in flatten order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [_path_str(path) for path, _ in leaves]


def path_labels(params: Any, rules: Sequence[tuple[str, Any]], default: Any) -> Any:
    """Pytree like `params` whose leaves are the value of the first rule whose regex fullmatches
    the leaf's '/'-joined path, else `default`."""
    compiled = [(re.compile(regex), value) for regex, value in rules]

    def label(path: tuple, _: Any) -> Any:
        name = _path_str(path)
        for pattern, value in compiled:
            if pattern.fullmatch(name):
                return value
        return default

    return jax.tree_util.tree_map_with_path(label, params)


def _path_str(path: tuple) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


# ---------------------------------------------------------------------------------------------
# The learning rate.


def scaled_lr(base_lr: float, batch_size: int, divisor: int) -> float:
    """The paper's linear scaling rule: base_lr * batch_size / divisor (divisor 0: base_lr)."""
    return base_lr * batch_size / divisor if divisor else base_lr


def make_schedule(
    kind: str, peak: float, *, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> Schedule:
    """lr(step): linear warmup from 0 to `peak` over `warmup_steps`, then `peak` ("constant") or
    a half-cycle cosine from `peak` at the end of warmup to `min_lr` at `total_steps` ("cosine";
    held at min_lr after). Works on traced steps."""
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(step: Any) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        if kind == "constant":
            after = jnp.asarray(peak, jnp.float32)
        else:
            progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
            # 0.5 * (1 + cos(pi p)) written as cos(pi p / 2)^2: no cancellation near the end.
            after = min_lr + (peak - min_lr) * jnp.cos(0.5 * jnp.pi * progress) ** 2
        return jnp.where(step < warmup_steps, warm, after)

    return schedule


# ---------------------------------------------------------------------------------------------
# Optimisers: one function each.


def _adamw(cfg: dict, lr: Schedule, decay_mask: Callable) -> optax.GradientTransformation:
    return optax.adamw(
        lr,
        b1=cfg.get("b1", 0.9),
        b2=cfg.get("b2", 0.95),
        eps=cfg.get("eps", 1e-8),
        weight_decay=cfg.get("weight_decay", 0.05),
        mask=decay_mask,
    )


def _sgd(cfg: dict, lr: Schedule, decay_mask: Callable) -> optax.GradientTransformation:
    # L2 decay added to the gradient before momentum, as torch.optim.SGD's weight_decay.
    return optax.chain(
        optax.add_decayed_weights(cfg.get("weight_decay", 0.05), decay_mask),
        optax.sgd(lr, momentum=0.9, nesterov=False),
    )


OPTIMIZERS: dict[str, Callable[[dict, Schedule, Callable], optax.GradientTransformation]] = {
    "adamw": _adamw,
    "sgd": _sgd,
}


# ---------------------------------------------------------------------------------------------
# The chain.


def build(
    config_optim: Any, *, batch_size: int, total_steps: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """(tx, lr_schedule) from `config.optim` (ConfigDict or dict); see the module docstring.

    Regexes that match no parameter raise UserError at `tx.init(params)`, the first time the
    parameter names are known (the default `no_decay` regexes are exempt: not every backbone has
    position embeddings).
    """
    cfg = config_optim.to_dict() if hasattr(config_optim, "to_dict") else dict(config_optim)
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise UserError(
            f"config.optim.name: unknown optimiser '{name}'; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    for key in ("base_lr", "lr_batch_divisor"):
        if cfg.get(key) is None:
            raise UserError(
                f"config.optim.{key} is missing; set it (lr = base_lr * batch_size / "
                "lr_batch_divisor, divisor 0 for no scaling)"
            )
    divisor = cfg["lr_batch_divisor"]
    if divisor < 0:
        raise UserError(
            f"config.optim.lr_batch_divisor must be >= 0 (0 = no scaling), got {divisor}"
        )
    warmup = int(cfg.get("warmup_steps", 0) or 0)
    if total_steps < 1 or not 0 <= warmup <= total_steps:
        raise UserError(
            f"config.optim.warmup_steps ({warmup}) must be between 0 and the total number of "
            f"training steps ({total_steps}); shorten the warmup or train longer"
        )
    kind = cfg.get("schedule", "cosine")
    if kind not in SCHEDULES:
        raise UserError(
            f"config.optim.schedule: unknown schedule '{kind}'; known: {', '.join(SCHEDULES)}"
        )
    peak = scaled_lr(cfg["base_lr"], batch_size, divisor)
    schedule = make_schedule(
        kind, peak, warmup_steps=warmup, total_steps=total_steps, min_lr=cfg.get("min_lr", 0.0)
    )

    no_decay = _regexes(cfg.get("no_decay", DEFAULT_NO_DECAY), "no_decay")
    frozen = _regexes(cfg.get("frozen", ()), "frozen")
    lr_mults = _mult_rules(cfg.get("lr_mults", ()))
    decay_rules = [(r, False) for r in (*no_decay, *frozen)]

    def decay_mask(params: Any) -> Any:
        return path_labels(params, decay_rules, True)

    chain = []
    clip = cfg.get("grad_clip_norm")
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(OPTIMIZERS[name](cfg, schedule, decay_mask))
    if lr_mults:
        chain.append(_scale_by_path(lr_mults))
    tx = optax.multi_transform(
        {"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
        lambda params: path_labels(params, [(r, "frozen") for r in frozen], "train"),
    )
    checked = {
        "no_decay": [r for r in no_decay if r not in DEFAULT_NO_DECAY],
        "frozen": list(frozen),
        "lr_mults": [r for r, _ in lr_mults],
    }

    def init(params: Any) -> Any:
        paths = param_paths(params)
        for key, regexes in checked.items():
            for regex in regexes:
                if not any(re.fullmatch(regex, p) for p in paths):
                    raise UserError(
                        f"config.optim.{key}: regex {regex!r} matches no parameter (a typo?); "
                        f"parameters look like {paths[0]!r}"
                    )
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update), schedule


def _regexes(value: Any, key: str) -> tuple[str, ...]:
    regexes = (value,) if isinstance(value, str) else tuple(value or ())
    for regex in regexes:
        _compile(regex, key)
    return regexes


def _mult_rules(value: Any) -> tuple[tuple[str, float], ...]:
    rules = []
    for rule in value or ():
        if (
            isinstance(rule, str)
            or len(rule) != 2
            or isinstance(rule[1], bool)
            or not isinstance(rule[1], int | float)
        ):
            raise UserError(
                f"config.optim.lr_mults: each entry must be (regex, multiplier), got {rule!r}"
            )
        _compile(rule[0], "lr_mults")
        rules.append((rule[0], float(rule[1])))
    return tuple(rules)


def _compile(regex: Any, key: str) -> None:
    try:
        re.compile(regex)
    except (re.error, TypeError) as e:
        raise UserError(f"config.optim.{key}: {regex!r} is not a valid regex ({e})") from None


def _scale_by_path(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiply each update by the multiplier of its first matching rule (1 if none)."""

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mults = path_labels(updates, rules, 1.0)
        return jax.tree.map(lambda u, m: u * m, updates, mults), state

    return optax.GradientTransformation(init, update)
