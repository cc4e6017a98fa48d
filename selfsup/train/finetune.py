"""Fine-tuning: a pretraining checkpoint's backbone as the start of a run, and layer-wise
learning-rate decay.

Fine-tuning is the ordinary training loop with the `supervised` objective (see
`configs/finetune_vit_in1k.py`). Two loop-level pieces live here:

- `load_backbone` (config keys `init_from`, `init_from_step`): at the start of a new run the
  backbone's parameters and mutable collections (BatchNorm statistics) are copied from the
  checkpoint of another workdir. Every backbone leaf must be there with the same shape; parts
  that only pretraining uses (decoders, projectors: outside `backbone`; SimMIM's mask token
  inside it) are ignored, and the classifier head keeps its fresh initialisation. A resumed run
  restores its own checkpoint and never reads `init_from` again. The ViT's position embeddings
  are fixed sin-cos tables computed for the input size, not parameters, so fine-tuning at another
  resolution needs no interpolation.
- `layer_decay_multipliers` (config key `optim.layer_decay`): BEiT / MAE's layer-wise learning
  rate decay. A parameter in layer `i` of `L = num_layers` gets the multiplier decay^(L - i).
  Each backbone declares its layers (`num_layers`, `layer_id(path)`; see `selfsup.backbones`):
  for a ViT of depth D, as MAE's `lr_decay.py`, L = D + 1, the patch embedding, cls and mask
  tokens are layer 0, block b is layer b + 1, the final norm layer L; ConvNeXt and ResNet decay
  stage-wise (stem 0, stage s = 1..4 is layer s, L = 5). Parameters outside the backbone (the
  head) are layer L (multiplier 1).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from selfsup import backbones, pytree
from selfsup.errors import UserError
from selfsup.evaluators import backbone_variables
from selfsup.io import checkpoint, paths

# Backbone leaves a pretraining checkpoint may hold that a fine-tuned backbone does not build.
PRETRAINING_ONLY = (r"params/mask_token",)


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay.


def layer_rule(backbone: Any) -> tuple[Callable[[str], int], int]:
    """(layer_id, num_layers L) that `backbone` declares (see `selfsup.backbones`); UserError
    naming the backbone when it declares none."""
    layer_id, last = getattr(backbone, "layer_id", None), getattr(backbone, "num_layers", None)
    if layer_id is None or last is None:
        raise UserError(
            f"config.optim.layer_decay: backbone '{backbones.family(backbone)}' declares no "
            "layers for layer-wise decay (its Model has no `num_layers` and `layer_id`); set "
            "optim.layer_decay = 0"
        )
    return layer_id, last


def layer_ids(paths: list[str], backbone: Any) -> tuple[list[int], int]:
    """(layer id of each '/'-joined parameter path, number of layers L): the backbone's
    `layer_id` of the path inside it for paths under `backbone/`, L for every other parameter
    (the head)."""
    layer_id, last = layer_rule(backbone)
    prefix = "backbone/"
    return [layer_id(p[len(prefix) :]) if p.startswith(prefix) else last for p in paths], last


def layer_decay_multipliers(params: Any, decay: float, backbone: Any) -> Any:
    """Pytree like `params` of float learning-rate multipliers decay^(L - layer id), the layers
    as `backbone` (the model's `backbone` submodule) declares them."""
    ids, last = layer_ids(pytree.leaf_paths(params), backbone)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, [float(decay) ** (last - i) for i in ids])


# ---------------------------------------------------------------------------------------------
# init_from.


def load_backbone(state, workdir: str, step: int | None = None, *, verbose: bool = True):
    """`state` with its backbone's parameters and mutable collections taken from the checkpoint
    `step` (latest when None) of `workdir`, placed on the state's shardings; everything else
    (head, optimiser state, step) unchanged. UserError when a backbone leaf is missing or has
    another shape, or the checkpoint holds backbone leaves this backbone lacks."""
    if not paths.path(workdir).is_dir():
        raise UserError(
            f"config.init_from: {workdir!r} is not a directory; give the workdir of a "
            "pretraining run (or '' to start from random initialisation)"
        )
    trees, meta = checkpoint.restore_tree(workdir, ("params", "model_state"), step)
    where = f"config.init_from: checkpoint {workdir} (step {meta['step']})"
    saved = (meta.get("config") or {}).get("backbone", "unknown")
    fix = f"its backbone is {saved}; set config.backbone to match it"
    if "backbone" not in trees["params"]:
        raise UserError(f"{where} has no 'backbone' parameters: not a selfsup training run")
    source = pytree.by_path(backbone_variables(trees["params"], trees["model_state"]))
    target = backbone_variables(state.params, state.model_state)
    wanted = pytree.by_path(target)
    for key, leaf in wanted.items():
        if key not in source:
            raise UserError(f"{where} has no backbone {key}, which config.backbone builds; {fix}")
        if tuple(source[key].shape) != tuple(leaf.shape):
            raise UserError(
                f"{where}: backbone {key} has shape {tuple(source[key].shape)} there but "
                f"{tuple(leaf.shape)} in config.backbone; {fix}"
            )
    extra = [k for k in source.keys() - wanted.keys() if not _pretraining_only(k)]
    if extra:
        raise UserError(
            f"{where} has backbone {sorted(extra)[0]}, which config.backbone does not build; {fix}"
        )

    def place(path: tuple, leaf: jax.Array) -> jax.Array:
        value = np.asarray(source[pytree.path_str(path)])
        value = value.astype(leaf.dtype)
        # Every process holds the whole array: each takes the shards its devices own.
        return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx: value[idx])

    loaded = jax.tree_util.tree_map_with_path(place, target)
    model_state = dict(state.model_state)
    for collection, tree in loaded.items():
        if collection != "params":
            model_state[collection] = {**model_state[collection], "backbone": tree}
    if verbose and jax.process_index() == 0:
        print(
            f"selfsup: backbone initialised from {workdir} step {meta['step']} "
            f"({len(wanted)} arrays)",
            file=sys.stderr,
        )
    # The optimiser state needs no reset: it was initialised from zeros, not from the values.
    return state.replace(
        params={**state.params, "backbone": loaded["params"]}, model_state=model_state
    )


def _pretraining_only(key: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern in PRETRAINING_ONLY)
