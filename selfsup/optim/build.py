"""`build(config.optim, ...)` -> (tx, schedule): the chain of clipping, optimiser, masks and
multipliers, with every key checked.
"""

from __future__ import annotations

import re
from typing import Any

import optax

from selfsup import config as config_lib
from selfsup import pytree
from selfsup.errors import UserError
from selfsup.optim.optimizers import OPTIMIZERS, Hyper
from selfsup.optim.schedules import SCHEDULES, Schedule, make_schedule, scaled_lr
from selfsup.optim.transforms import (
    hold_until,
    path_labels,
    scale_by_layer_decay,
    scale_by_path,
    zero_inactive,
)


def build(
    config_optim: Any, *, batch_size: int, total_steps: int, backbone: Any = None
) -> tuple[optax.GradientTransformation, Schedule]:
    """(tx, lr_schedule) from `config.optim` (ConfigDict or dict); see the module docstring.
    `backbone`, the model's backbone module, declares the layers of `layer_decay` (needed then).
    Keys it lacks take their values from `selfsup.config.defaults().optim`.

    Regexes that match no parameter raise UserError at `tx.init(params)`, the first time the
    parameter names are known (the default `no_decay` regexes are exempt: not every backbone has
    position embeddings).
    """
    defaults = config_lib.defaults().optim.to_dict()
    given = config_optim.to_dict() if hasattr(config_optim, "to_dict") else dict(config_optim)
    cfg = {**defaults, **given}
    name = cfg["name"]
    if name not in OPTIMIZERS:
        raise UserError(
            f"config.optim.name: unknown optimiser '{name}'; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    for key in ("base_lr", "lr_batch_divisor"):
        if cfg[key] is None:
            raise UserError(
                f"config.optim.{key} is missing; set it (lr = base_lr * batch_size / "
                "lr_batch_divisor, divisor 0 for no scaling)"
            )
    divisor = cfg["lr_batch_divisor"]
    if divisor < 0:
        raise UserError(
            f"config.optim.lr_batch_divisor must be >= 0 (0 = no scaling), got {divisor}"
        )
    warmup = int(cfg["warmup_steps"] or 0)
    if total_steps < 1 or not 0 <= warmup <= total_steps:
        raise UserError(
            f"config.optim.warmup_steps ({warmup}) must be between 0 and the total number of "
            f"training steps ({total_steps}); shorten the warmup or train longer"
        )
    kind = cfg["schedule"]
    if kind not in SCHEDULES:
        raise UserError(
            f"config.optim.schedule: unknown schedule '{kind}'; known: {', '.join(SCHEDULES)}"
        )
    peak = scaled_lr(cfg["base_lr"], batch_size, divisor)
    schedule = make_schedule(
        kind, peak, warmup_steps=warmup, total_steps=total_steps, min_lr=cfg["min_lr"]
    )

    no_decay = _regexes(cfg["no_decay"], "no_decay")
    frozen = _regexes(cfg["frozen"], "frozen")
    lars_exclude = cfg["lars_exclude"]
    lars_exclude = no_decay if lars_exclude is None else _regexes(lars_exclude, "lars_exclude")
    lr_mults = _mult_rules(cfg["lr_mults"])
    decay_rules = [(r, False) for r in (*no_decay, *frozen)]
    adapt_rules = [(r, False) for r in (*lars_exclude, *frozen)]
    hyper = Hyper(
        lr=schedule,
        weight_decay=_weight_decay(cfg, total_steps),
        decay_mask=lambda params: path_labels(params, decay_rules, True),
        adapt_mask=lambda params: path_labels(params, adapt_rules, True),
    )
    for key in ("momentum", "trust_coefficient"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"config.optim.{key} must be a number >= 0, got {value!r}")

    chain = []
    clip = cfg["grad_clip_norm"]
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(OPTIMIZERS[name](cfg, hyper))
    if lr_mults:
        chain.append(scale_by_path(lr_mults))
    held = _hold_rules(cfg["frozen_until"])
    if held:
        # Clipping goes outside, over the gradients left after zeroing frozen and held ones.
        clip_tx = chain[:-1] if not lr_mults else chain[:-2]
        parts = chain[len(clip_tx) :]
        group_rules = [(r, "frozen") for r in frozen] + [
            (r, f"held_{i}") for i, (r, _) in enumerate(held)
        ]
        groups = {"train": optax.chain(*parts), "frozen": optax.set_to_zero()}
        for i, (_, steps) in enumerate(held):
            groups[f"held_{i}"] = hold_until(optax.chain(*parts), steps)
        labels = lambda params: path_labels(params, group_rules, "train")  # noqa: E731
        tx = optax.chain(
            zero_inactive(labels, {f"held_{i}": s for i, (_, s) in enumerate(held)}),
            *clip_tx,
            optax.multi_transform(groups, labels),
        )
    else:
        tx = optax.multi_transform(
            {"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
            lambda params: path_labels(params, [(r, "frozen") for r in frozen], "train"),
        )
    layer_decay = cfg["layer_decay"] or 0.0
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, int | float):
        raise UserError(f"config.optim.layer_decay must be a number, got {layer_decay!r}")
    if not 0.0 <= layer_decay <= 1.0:
        raise UserError(
            f"config.optim.layer_decay must be in [0, 1] (0 = off; MAE: 0.65 for ViT-B, 0.75 for "
            f"ViT-L), got {layer_decay}"
        )
    if layer_decay:
        if backbone is None:
            raise ValueError("optim.build: layer_decay needs the backbone, which names the layers")
        # Outside the groups: the multipliers need every parameter's path.
        tx = optax.chain(tx, scale_by_layer_decay(layer_decay, backbone))
    checked = {
        "no_decay": [r for r in no_decay if r not in defaults["no_decay"]],
        "lars_exclude": [r for r in lars_exclude if r not in (*defaults["no_decay"], *no_decay)],
        "frozen": list(frozen),
        "lr_mults": [r for r, _ in lr_mults],
        "frozen_until": [r for r, _ in held],
    }

    def init(params: Any) -> Any:
        paths = pytree.leaf_paths(params)
        for key, regexes in checked.items():
            for regex in regexes:
                if not any(re.fullmatch(regex, p) for p in paths):
                    raise UserError(
                        f"config.optim.{key}: regex {regex!r} matches no parameter (a typo?); "
                        f"parameters look like {paths[0]!r}"
                    )
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init, tx.update), schedule


def _weight_decay(cfg: dict, total_steps: int) -> float | Schedule:
    """The weight decay: a constant, or a cosine to `weight_decay_end` over the whole run."""
    wd, end = cfg["weight_decay"], cfg["weight_decay_end"]
    for key, value in (("weight_decay", wd), ("weight_decay_end", end)):
        if value is None and key == "weight_decay_end":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"config.optim.{key} must be a number >= 0, got {value!r}")
    if end is None:
        return wd
    # make_schedule's cosine without warmup: wd at step 0, `end` at total_steps (either order).
    return make_schedule("cosine", wd, warmup_steps=0, total_steps=total_steps, min_lr=end)


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


def _hold_rules(value: Any) -> tuple[tuple[str, int], ...]:
    rules = []
    for rule in value or ():
        if (
            isinstance(rule, str)
            or len(rule) != 2
            or isinstance(rule[1], bool)
            or not isinstance(rule[1], int)
            or rule[1] < 0
        ):
            raise UserError(
                "config.optim.frozen_until: each entry must be (regex, steps >= 0), e.g. "
                f"('prototypes', 5005); got {rule!r}"
            )
        _compile(rule[0], "frozen_until")
        rules.append((rule[0], int(rule[1])))
    return tuple(rules)
