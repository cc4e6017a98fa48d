"""Config files, `path.py:arg` variants, `--config.key=value` overrides, and the loop's defaults.

A config file defines `get_config(arg: str | None) -> ConfigDict`. `arg` is the text after the
colon in `--config configs/mae_vit.py:variant=B/16,smoke`; `parse_arg` turns it into a
ConfigDict of typed options. `resolve` lays the user's config over `defaults()` and rejects any
key the loop does not know, so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Any

import ml_collections as mlc

from selfsup.errors import UserError

# Keys whose sub-keys belong to a module's constructor (validated there, not here).
FREE_FORM = ("objective", "backbone")
# The `data` keys each source reads; `resolve` drops the others (a folder run's config.json has
# no leftover `name: shapes`).
SOURCE_KEYS = {"builtin": ("name",), "tfds": ("name", "data_dir"), "npz": ("path",)}
SOURCE_KEYS["folder"] = SOURCE_KEYS["npz"]


def defaults() -> mlc.ConfigDict:
    """Every loop-level key with its default (objective and backbone keys: their modules)."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all processes and devices
    c.total_steps = 0  # give exactly one of total_steps / total_epochs
    c.total_epochs = 0.0
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.image_every_steps = (
        1000  # reconstruction images (objectives with `reconstruct`); 0 = end only
    )
    c.num_images = 8
    c.compute_dtype = "float32"  # or "bfloat16": activations in bf16, parameters stay float32
    c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1})  # -1: all remaining devices
    # (regex over '/'-joined state paths, placement): "fsdp" shards the largest dim divisible by
    # the fsdp axis, "replicate" copies; first match wins; unmatched leaves are replicated.
    c.param_sharding = ((".*", "fsdp"),)
    c.views = ("rrc(224, scale=(0.2, 1.0), method='bicubic')|flip|normalize('imagenet')",)
    c.data = mlc.ConfigDict(
        {"source": "builtin", "name": "shapes", "data_dir": "", "path": "", "image_size": 32}
    )
    # Fine-tuning: a new run (no checkpoint in the workdir) copies the backbone from this
    # pretraining workdir's checkpoint `init_from_step` (0: the latest); see selfsup.train.finetune.
    c.init_from = ""
    c.init_from_step = 0
    # Evaluators on the live backbone during training (selfsup.evaluators.periodic): `run` holds
    # evaluator configs (dicts, see selfsup.evaluators), run every `every_steps` steps (0: never
    # during training) and at the last step if `at_end`; `random_init` adds the same evaluators
    # on the backbone at random initialisation, the baseline, logged as random_init/<label>/...
    c.evaluators = mlc.ConfigDict(
        {"every_steps": 0, "at_end": True, "random_init": False, "run": ()}
    )
    c.objective = mlc.ConfigDict({"name": "mae"})
    c.backbone = mlc.ConfigDict({"name": "vit"})
    c.optim = mlc.ConfigDict(
        {
            "name": "adamw",
            "base_lr": 1.5e-4,
            "lr_batch_divisor": 256,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.05,
            "weight_decay_end": None,  # a number: cosine from weight_decay to it (SparK, DINO)
            "no_decay": (r".*/bias$", r".*/scale$", r".*(pos_embed|cls_token|mask_token).*"),
            "momentum": 0.9,  # sgd, lars, lars_simclr
            "trust_coefficient": 1e-3,  # LARS' eta
            "lars_exclude": None,  # LARS/LAMB: regexes not trust-ratio adapted; None: no_decay
            "schedule": "cosine",
            "min_lr": 0.0,
            "warmup_steps": 0,
            "warmup_epochs": 0.0,
            "grad_clip_norm": 0.0,
            "lr_mults": (),
            "frozen": (),
            "frozen_until": (),  # (regex, steps): frozen for the first `steps` steps (SwAV)
            "layer_decay": 0.0,  # layer-wise LR decay (BEiT/MAE fine-tuning, e.g. 0.65); 0: off
        }
    )
    return c


def parse_arg(arg: str | None, **options: Any) -> mlc.ConfigDict:
    """`"variant=B/16,smoke"` -> ConfigDict(variant="B/16", smoke=True, <other options' defaults>).

    Each option's default fixes its type; a bare name sets a bool to True.
    """
    out = mlc.ConfigDict(options)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in options:
            raise UserError(
                f"config argument '{key}' is unknown; this config takes: {', '.join(options)}"
            )
        out[key] = _cast(value if eq else "True", options[key], f"config argument '{key}'")
    return out


def load(spec: str) -> mlc.ConfigDict:
    """Load `path.py[:arg]` by calling the file's `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found (give a path like configs/quickstart.py)")
    module_spec = importlib.util.spec_from_file_location("_selfsup_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file '{path}' has no get_config(arg) function")
    config = module.get_config(arg or None)
    return config if isinstance(config, mlc.ConfigDict) else mlc.ConfigDict(config)


def override(config: mlc.ConfigDict, key: str, value: str) -> None:
    """Apply `--config.<key>=<value>`; the existing value's type decides how `value` parses."""
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], mlc.ConfigDict):
            raise UserError(
                f"--config.{key}: unknown config key 'config.{'.'.join(parents[: i + 1])}'"
            )
        node = node[part]
    if leaf not in node and len(parents) == 1 and parents[0] in FREE_FORM:
        # A constructor argument the file left at its default; its module checks name and type.
        with node.unlocked():
            node[leaf] = _cast(value, None, f"--config.{key}")
        return
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise UserError(f"--config.{key}: unknown config key '{leaf}'; known keys here: {known}")
    with node.unlocked():
        node[leaf] = _cast(value, node[leaf], f"--config.{key}")


def resolve(config: mlc.ConfigDict, overrides: dict[str, str] | None = None) -> mlc.ConfigDict:
    """The user's config laid over `defaults()`, then `--config.key=value` overrides applied.

    Unknown keys and values of the wrong type are UserErrors naming the key.
    """
    out = defaults()
    _merge(out, config, "config")
    for key, value in (overrides or {}).items():
        override(out, key, value)
    if (out.total_steps > 0) == (out.total_epochs > 0):
        raise UserError("config: give exactly one of total_steps and total_epochs (> 0)")
    if (out.optim.warmup_steps > 0) and (out.optim.warmup_epochs > 0):
        raise UserError("config.optim: give at most one of warmup_steps and warmup_epochs")
    if out.compute_dtype not in ("float32", "bfloat16"):
        raise UserError(f"config.compute_dtype: '{out.compute_dtype}' is not float32 or bfloat16")
    if not out.views:
        raise UserError("config.views: at least one view spec is needed")
    for key, meaning in (
        ("keep_checkpoints", "the number of checkpoints kept; the final one always is"),
        ("checkpoint_every_steps", "steps between checkpoints"),
        ("log_every_steps", "steps between metric records"),
    ):
        if out[key] < 1:
            raise UserError(f"config.{key} is {out[key]}; it must be >= 1 ({meaning})")
    if out.init_from_step < 0:
        raise UserError("config.init_from_step must be >= 0 (0: the latest checkpoint)")
    if out.evaluators.every_steps < 0:
        raise UserError("config.evaluators.every_steps must be >= 0 (0: not during training)")
    run = out.evaluators.run
    if not all(isinstance(c, dict | mlc.ConfigDict) for c in run):
        raise UserError(
            "config.evaluators.run: give a tuple of evaluator configs (dicts such as "
            f"dict(name='knn', train_limit=2000)), got {run!r}"
        )
    for key in {"name", "data_dir", "path"} - set(SOURCE_KEYS.get(out.data.source, ("name",))):
        del out.data[key]
    # Plain dicts: the config is saved as JSON in every checkpoint.
    out.evaluators.run = tuple(
        c.to_dict() if isinstance(c, mlc.ConfigDict) else dict(c) for c in run
    )
    out.lock()
    return out


def to_json(config: mlc.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _merge(base: mlc.ConfigDict, user: mlc.ConfigDict, where: str) -> None:
    for key, value in user.items():
        path = f"{where}.{key}"
        if key not in base:
            known = ", ".join(sorted(base.keys()))
            raise UserError(f"{path}: unknown config key '{key}'; known keys here: {known}")
        if key in FREE_FORM:
            base[key] = mlc.ConfigDict(value)
        elif isinstance(base[key], mlc.ConfigDict):
            if not isinstance(value, (dict, mlc.ConfigDict)):
                raise UserError(f"{path}: expected a dict of settings, got {value!r}")
            _merge(base[key], mlc.ConfigDict(value), path)
        else:
            base[key] = _check_type(value, base[key], path)


def _check_type(value: Any, default: Any, where: str) -> Any:
    if default is None or value is None or isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif (
        isinstance(default, float)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(value)
    elif type(value) is type(default):
        return value
    raise UserError(f"{where}: expected {type(default).__name__}, got {value!r}")


def _cast(text: str, default: Any, where: str) -> Any:
    """Parse command-line `text` into the type of `default`."""
    if isinstance(default, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default is None:
            return text
        raise UserError(f"{where}: cannot read '{text}' as {type(default).__name__}") from None
    if isinstance(default, bool) and isinstance(value, int) and value in (0, 1):
        value = bool(value)
    if default is None:
        return value
    return _check_type(value, default, where)
