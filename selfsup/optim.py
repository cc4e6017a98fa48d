"""Optax chains from `config.optim`: schedule, batch-size LR scaling, and parameter masks.

Parameter subsets are addressed by regexes over '/'-joined key paths
("backbone/blocks_0/attn/qkv/kernel"), matched with `re.fullmatch`, first match winning:
`no_decay` (no weight decay), `frozen` (zero updates, no optimiser state, outside the clipping
norm), `lr_mults` (per-parameter LR multipliers) and `lars_exclude` (no trust-ratio adaptation in
LARS and LAMB; None: the `no_decay` regexes). The chain for trainable parameters is
clip-by-global-norm -> optimiser (its LR from the schedule) -> LR multipliers.

An optimiser is one function `(cfg, Hyper) -> GradientTransformation` in `OPTIMIZERS`:

- `adamw`: decoupled weight decay (optax.adamw, as torch.optim.AdamW).
- `sgd`: momentum SGD with L2 decay added to the gradient (torch.optim.SGD).
- `lars_simclr`: LARS as SimCLR's TF implementation (You et al. 2017; Chen et al. 2020), the LR
  inside the momentum: v = m v + lr * trust * (g + wd w); w -= v.
- `lars`: LARS as Barlow Twins' and BYOL's implementations, the LR after the momentum:
  v = m v + trust * (g + wd w); w -= lr * v.
  Both: trust = eta ||w|| / ||g + wd w|| per parameter array (1 where a norm is 0), eta =
  `trust_coefficient` (1e-3). The variants differ while the LR changes (warmup, cosine).
  Barlow Twins' separate bias/BN LR (0.0048 vs 0.2 x batch/256) is
  `lr_mults=((r".*/bias$", 0.024), (r".*/scale$", 0.024))` with `base_lr=0.2`.
- `lamb`: LAMB (You et al. 2020) as timm's Lamb, which SparK uses: u = Adam's bias-corrected
  step + wd w, scaled by ||w|| / ||u|| per parameter array (1 where a norm is 0) except for the
  `lars_exclude` parameters (timm adapts only its weight-decayed group); w -= lr * that.

`frozen_until` is a list of (regex, steps): those parameters are frozen for the first `steps`
steps, then train (SwAV's prototypes, frozen for the first epoch). While held, they get no update,
their optimiser state does not change (as a PyTorch parameter whose .grad is None), and they are
left out of the clipping norm; integer counters (the LR schedule's) advance, so the LR is the
global schedule's (for Adam, the bias correction also counts from step 0: a deviation from
PyTorch's per-parameter step count).

`layer_decay` (0: off) multiplies each parameter's learning rate by decay^(L - layer id), BEiT /
MAE's layer-wise decay, after the `lr_mults` (see `selfsup.finetune.layer_decay_multipliers`).
As in PyTorch, where it scales a parameter group's lr, it scales AdamW's decoupled weight decay too.

`weight_decay_end` (None: constant) makes the weight decay a cosine from `weight_decay` at step 0
to `weight_decay_end` at the last step, for every optimiser (SparK: 0.04 -> 0.2, DINO-style).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


class Hyper(NamedTuple):
    """What `build` resolves for an optimiser: schedules and masks (mask(params) -> bool tree)."""

    lr: Schedule
    weight_decay: float | Schedule  # a schedule when config.optim.weight_decay_end is set
    decay_mask: Callable[[Any], Any]  # True: weight-decayed
    adapt_mask: Callable[[Any], Any]  # True: trust-ratio adapted (LARS, LAMB)


def _adamw(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    return optax.adamw(
        hp.lr,
        b1=cfg.get("b1", 0.9),
        b2=cfg.get("b2", 0.95),
        eps=cfg.get("eps", 1e-8),
        weight_decay=hp.weight_decay,
        mask=hp.decay_mask,
    )


def _sgd(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # L2 decay added to the gradient before momentum, as torch.optim.SGD's weight_decay.
    return optax.chain(
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        optax.sgd(hp.lr, momentum=cfg.get("momentum", 0.9), nesterov=False),
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
        _trust_ratio(hp, cfg.get("trust_coefficient", 1e-3)),
        optax.scale_by_learning_rate(hp.lr),
        optax.trace(decay=cfg.get("momentum", 0.9), nesterov=False),
    )


def _lars(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # trace before scale_by_learning_rate: the buffer holds trust-scaled steps, lr multiplies it.
    return optax.chain(
        optax.add_decayed_weights(hp.weight_decay, hp.decay_mask),
        _trust_ratio(hp, cfg.get("trust_coefficient", 1e-3)),
        optax.trace(decay=cfg.get("momentum", 0.9), nesterov=False),
        optax.scale_by_learning_rate(hp.lr),
    )


def _lamb(cfg: dict, hp: Hyper) -> optax.GradientTransformation:
    # optax.lamb adapts every parameter; timm's Lamb (SparK) skips its no-decay group: the mask.
    return optax.chain(
        optax.scale_by_adam(
            b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.95), eps=cfg.get("eps", 1e-8)
        ),
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
    lars_exclude = cfg.get("lars_exclude")
    lars_exclude = no_decay if lars_exclude is None else _regexes(lars_exclude, "lars_exclude")
    lr_mults = _mult_rules(cfg.get("lr_mults", ()))
    decay_rules = [(r, False) for r in (*no_decay, *frozen)]
    adapt_rules = [(r, False) for r in (*lars_exclude, *frozen)]
    hyper = Hyper(
        lr=schedule,
        weight_decay=_weight_decay(cfg, total_steps),
        decay_mask=lambda params: path_labels(params, decay_rules, True),
        adapt_mask=lambda params: path_labels(params, adapt_rules, True),
    )
    for key in ("momentum", "trust_coefficient"):
        value = cfg.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise UserError(f"config.optim.{key} must be a number >= 0, got {value!r}")

    chain = []
    clip = cfg.get("grad_clip_norm")
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(OPTIMIZERS[name](cfg, hyper))
    if lr_mults:
        chain.append(_scale_by_path(lr_mults))
    held = _hold_rules(cfg.get("frozen_until", ()))
    if held:
        # Clipping goes outside, over the gradients left after zeroing frozen and held ones.
        clip_tx = chain[:-1] if not lr_mults else chain[:-2]
        parts = chain[len(clip_tx) :]
        group_rules = [(r, "frozen") for r in frozen] + [
            (r, f"held_{i}") for i, (r, _) in enumerate(held)
        ]
        groups = {"train": optax.chain(*parts), "frozen": optax.set_to_zero()}
        for i, (_, steps) in enumerate(held):
            groups[f"held_{i}"] = _hold_until(optax.chain(*parts), steps)
        labels = lambda params: path_labels(params, group_rules, "train")  # noqa: E731
        tx = optax.chain(
            _zero_inactive(labels, {f"held_{i}": s for i, (_, s) in enumerate(held)}),
            *clip_tx,
            optax.multi_transform(groups, labels),
        )
    else:
        tx = optax.multi_transform(
            {"train": optax.chain(*chain), "frozen": optax.set_to_zero()},
            lambda params: path_labels(params, [(r, "frozen") for r in frozen], "train"),
        )
    layer_decay = cfg.get("layer_decay", 0.0) or 0.0
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, int | float):
        raise UserError(f"config.optim.layer_decay must be a number, got {layer_decay!r}")
    if not 0.0 <= layer_decay <= 1.0:
        raise UserError(
            f"config.optim.layer_decay must be in [0, 1] (0 = off; MAE: 0.65 for ViT-B, 0.75 for "
            f"ViT-L), got {layer_decay}"
        )
    if layer_decay:
        # Outside the groups: the multipliers need every parameter's path to count the layers.
        tx = optax.chain(tx, _scale_by_layer_decay(layer_decay))
    checked = {
        "no_decay": [r for r in no_decay if r not in DEFAULT_NO_DECAY],
        "lars_exclude": [r for r in lars_exclude if r not in (*DEFAULT_NO_DECAY, *no_decay)],
        "frozen": list(frozen),
        "lr_mults": [r for r, _ in lr_mults],
        "frozen_until": [r for r, _ in held],
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


def _weight_decay(cfg: dict, total_steps: int) -> float | Schedule:
    """The weight decay: a constant, or a cosine to `weight_decay_end` over the whole run."""
    wd, end = cfg.get("weight_decay", 0.05), cfg.get("weight_decay_end")
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


def _scale_by_path(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiply each update by the multiplier of its first matching rule (1 if none)."""

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mults = path_labels(updates, rules, 1.0)
        return jax.tree.map(lambda u, m: u * m, updates, mults), state

    return optax.GradientTransformation(init, update)


def _scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
    """Multiply each update by its layer's decay^(L - layer id)."""
    from selfsup.finetune import layer_decay_multipliers  # here: finetune imports orbax

    def init(params: Any) -> optax.EmptyState:
        layer_decay_multipliers(params, decay)  # an unknown backbone fails here, at the start
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        mults = layer_decay_multipliers(updates, decay)
        return jax.tree.map(lambda u, m: u * m, updates, mults), state

    return optax.GradientTransformation(init, update)


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


class HoldState(NamedTuple):
    count: jax.Array  # steps seen
    inner: Any


def _hold_until(inner: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """`inner` from step `steps` on; before, zero updates and unchanged float state."""

    def init(params: Any) -> HoldState:
        return HoldState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates: Any, state: HoldState, params: Any = None) -> tuple[Any, HoldState]:
        new_updates, new_inner = inner.update(updates, state.inner, params)
        active = state.count >= steps

        def keep(new: jax.Array, old: jax.Array) -> jax.Array:
            # Integer leaves are step counters (schedules): they advance while held.
            if jnp.issubdtype(new.dtype, jnp.integer):
                return new
            return jnp.where(active, new, old)

        out = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), new_updates)
        inner_state = jax.tree.map(keep, new_inner, state.inner)
        return out, HoldState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init, update)


def _zero_inactive(labels: Callable[[Any], Any], held: dict[str, int]):
    """Zero the gradients of frozen parameters and of held ones before their step."""

    def init(params: Any) -> optax.ScaleByScheduleState:
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def zero(label: str, g: jax.Array) -> jax.Array:
            if label == "frozen":
                return jnp.zeros_like(g)
            if label in held:
                return jnp.where(state.count >= held[label], g, jnp.zeros_like(g))
            return g

        out = jax.tree.map(zero, labels(updates), updates)
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
