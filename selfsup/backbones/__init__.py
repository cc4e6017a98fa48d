"""Backbones: one file per family, each a Linen `Model(variant=...)` returning `Features`.

A family is found by its module name (`config.backbone.name = "vit"` imports
`selfsup.backbones.vit`), so adding one is adding one file.

A Model may declare its layers for layer-wise learning-rate decay (`optim.layer_decay`):
`num_layers` (L) and `layer_id(path) -> int` in 0..L for a '/'-joined parameter path inside the
backbone ("blocks_3/attn/qkv/kernel"): 0 for the input embedding, L for what follows the last
layer. `selfsup.train.finetune.layer_decay_multipliers` reads them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

import flax.linen as nn
import jax
from flax import struct

from selfsup.errors import UserError

MASK_MODES = ("drop", "replace", "sparse", "causal_prefix")


@struct.dataclass
class Features:
    """What every backbone returns.

    pooled: [B, D] the image embedding (cls token or average of tokens / final map).
    tokens: [B, N, D] patch tokens after the final norm (N = kept tokens under mask `drop`),
      or None for convnets.
    cls: [B, D] the cls token after the final norm, or None.
    feature_maps: per-stage maps [B, H_s, W_s, C_s] for convnets (strides 4, 8, 16, 32), else ().
    intermediates: named outputs ("block_0", ...) that evaluators pick by name.
    """

    pooled: jax.Array
    tokens: jax.Array | None = None
    cls: jax.Array | None = None
    feature_maps: tuple = ()
    intermediates: dict = dataclasses.field(default_factory=dict)


@struct.dataclass
class Mask:
    """A mask handed to a backbone; `mode` says how `value` reads.

    drop:          value int32 [B, K], indices of the kept patch tokens (MAE encodes only these).
    replace:       value bool [B, N], True = masked patch, replaced by a learned mask token.
    sparse:        value bool [B, h, w], True = masked cell on the stride-32 grid (SparK).
    causal_prefix: value int32 [B], prefix length; tokens past it attend causally (AIM).
    """

    value: jax.Array
    mode: str = struct.field(pytree_node=False, default="drop")


def family(backbone: nn.Module) -> str:
    """The backbone's family, the name of its module ("vit" for `selfsup.backbones.vit.Model`)."""
    return type(backbone).__module__.rsplit(".", 1)[-1]


def check_mask_mode(backbone: nn.Module, mode: str, objective: str) -> None:
    """Raise a UserError when `backbone` cannot serve mask `mode` (called at build time)."""
    supported = getattr(backbone, "mask_modes", ())
    if mode not in supported:
        raise UserError(
            f"objective '{objective}' needs mask mode '{mode}', which backbone "
            f"'{family(backbone)}' does not support "
            f"(it supports: {', '.join(supported) or 'none'}); pick a backbone that does."
        )


def build(name: str, **kwargs: Any) -> nn.Module:
    """Backbone `selfsup.backbones.<name>.Model(**kwargs)`, with user errors for bad names/keys."""
    try:
        module = importlib.import_module(f"selfsup.backbones.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"selfsup.backbones.{name}":
            raise
        raise UserError(f"config.backbone.name: unknown backbone '{name}'") from None
    unknown = sorted(set(kwargs) - _fields(module.Model))
    owner = next((f for f in _families() if f != name and unknown and set(unknown) <= f[1]), None)
    if owner:
        # The usual cause: `--config.backbone.name=<name>` on a config whose other backbone
        # keys describe another family (an override cannot remove them).
        raise UserError(
            f"config.backbone ({name}): unknown key '{unknown[0]}', a setting of backbone "
            f"'{owner[0]}': this config's backbone keys are for '{owner[0]}', so changing only "
            f"config.backbone.name keeps them; use a config whose backbone is '{name}' or set "
            f"the whole backbone in the config file (valid keys for {name}: "
            f"{', '.join(sorted(_fields(module.Model)))})"
        )
    return construct(module.Model, kwargs, f"config.backbone ({name})")


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def _families() -> list[tuple[str, set[str]]]:
    """(family, constructor keys) of every backbone module."""
    out = []
    for info in pkgutil.iter_modules(__path__):
        model = getattr(importlib.import_module(f"{__name__}.{info.name}"), "Model", None)
        if model is not None:
            out.append((info.name, _fields(model)))
    return out


def construct(cls: type, kwargs: dict, where: str, **fixed: Any) -> Any:
    """cls(**fixed, **kwargs), turning unknown or missing keyword arguments into UserErrors."""
    fields = _fields(cls)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        valid = ", ".join(sorted(fields - set(fixed)))
        raise UserError(f"{where}: unknown key '{unknown[0]}'; valid keys: {valid}")
    try:
        return cls(**fixed, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None
