"""Evaluators of frozen features: one file per protocol (linear_probe, knn, attentive_probe).

An evaluator module `selfsup.evaluators.<name>` has `defaults()` (its own config keys) and
`Evaluator(encode_fn, config, *, mesh)`, whose `run(params)` yields `(name, value)` pairs and
leaves in `Evaluator.data` what each split held (`features.describe`: split, images, classes).
`encode_fn(params, images) -> Features` is the frozen backbone; the evaluator reads its own data.
Evaluators never see the objective. Adding one is adding one file.

An evaluator config is flat. The keys every evaluator has (`COMMON`):

  name           the module ("linear_probe", "knn", "attentive_probe", "classifier": the run's
                 own head on the test split, for fine-tuning)
  label          result prefix and JSON file name (`eval/<label>_step<N>.json`); "" = name
  data           `config.data` keys (source, name, path, data_dir, image_size); None = the
                 pretraining run's value
  train_split / test_split, train_limit / test_limit (0 = all; else a fixed random subset)
  view           preprocessing spec; "" = the pretraining view's size and normalisation after a
                 resize to size / crop_pct (bicubic) and a centre crop
  crop_pct       0.875 (224 of 256, the ImageNet protocol); 1.0 = no crop
  batch_size     global batch of the feature extraction (divisible by the device count)
  features       which feature (see `selfsup.evaluators.features`)
  seed, max_feature_gb, mesh (`selfsup eval` only), backbone (`selfsup eval`: keys laid over the
  checkpoint's backbone config), every_steps (`run_all`: run when step % every_steps == 0)
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc

from selfsup import augment, backbones
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.evaluators.features import EncodeFn, view_fn
from selfsup.parallel import sharding

DATA_KEYS = ("source", "name", "data_dir", "path", "image_size")


def common_defaults() -> mlc.ConfigDict:
    """The keys every evaluator config has, with their defaults (see the module docstring)."""
    return mlc.ConfigDict(
        {
            "name": "",
            "label": "",
            "data": {key: None for key in DATA_KEYS},
            "train_split": "train",
            "test_split": "test",
            "train_limit": 0,
            "test_limit": 0,
            "view": "",
            "crop_pct": 0.875,
            "batch_size": 256,
            "seed": 0,
            "max_feature_gb": 16.0,
            "mesh": {"data": -1, "fsdp": 1},
            "backbone": {},
            "every_steps": 0,
        }
    )


COMMON = tuple(common_defaults().keys())


def module(name: str):
    """The evaluator module `selfsup.evaluators.<name>`; UserError for an unknown name."""
    if not isinstance(name, str) or not name or name in ("features",):
        raise UserError(
            f"evaluator config: set name to an evaluator (e.g. 'linear_probe'), got {name!r}"
        )
    try:
        return importlib.import_module(f"selfsup.evaluators.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"selfsup.evaluators.{name}":
            raise
        raise UserError(
            f"evaluator config: unknown evaluator '{name}'; use linear_probe, knn or "
            "attentive_probe"
        ) from None


def resolve(config: Any, overrides: dict[str, str] | None = None) -> mlc.ConfigDict:
    """The evaluator config laid over its defaults, then `--config.key=value` overrides applied.

    Unknown keys and values of the wrong type are UserErrors naming the key.
    """
    config = mlc.ConfigDict(config)
    name = (overrides or {}).get("name", config.get("name", ""))
    out = common_defaults()
    out.update(module(name).defaults())
    for key, value in config.items():
        where = f"config.{key}"
        if key not in out:
            known = ", ".join(sorted(out.keys()))
            raise UserError(f"{where}: unknown evaluator key '{key}'; known keys: {known}")
        if key == "backbone":
            out.backbone = mlc.ConfigDict(dict(value))
        elif key in ("data", "mesh"):
            for sub, v in dict(value).items():
                if sub not in out[key]:
                    known = ", ".join(out[key].keys())
                    raise UserError(f"{where}.{sub}: unknown key '{sub}'; known keys: {known}")
                out[key][sub] = v
        else:
            out[key] = config_lib._check_type(value, out[key], where)
    for key, value in (overrides or {}).items():
        config_lib.override(out, key, value)
    if not re.fullmatch(r"[\w.-]*", out.label):
        raise UserError(f"config.label {out.label!r}: use letters, digits, '_', '-' and '.' only")
    return out


def default_view(train_config: Any, crop_pct: float = 0.875) -> str:
    """The evaluation view for a pretraining config: the output size and normalisation of its
    first view, after a bicubic resize of the shorter side to size / crop_pct and a centre crop."""
    if not 0 < crop_pct <= 1:
        raise UserError(f"evaluator config.crop_pct must be in (0, 1], got {crop_pct}")
    view = augment.view_geometry(train_config.views[0], train_config.data.image_size)
    h, w = view.height, view.width
    ops = [f"resize({round(min(h, w) / crop_pct)}, method='bicubic')", f"center_crop(({h}, {w}))"]
    ops += view.normalize
    inside = objective_normalization(train_config)
    if inside is not None and not any(op.startswith("normalize(") for op in ops):
        ops.append(inside)
    return "|".join(ops)


def objective_normalization(train_config: Any) -> str | None:
    """The normalize op of an objective that normalises its views itself (a `normalize` field:
    rotation, after rotating), as view-spec text; None for the others or for "none"."""
    name = train_config.objective.name
    try:
        objective = importlib.import_module(f"selfsup.objectives.{name}").Objective
    except (ImportError, AttributeError):
        return None
    field = getattr(objective, "__dataclass_fields__", {}).get("normalize")
    if field is None:
        return None
    value = train_config.objective.get("normalize", field.default)
    if isinstance(value, str):
        return None if value == "none" else f"normalize({value!r})"
    mean, std = (tuple(v) if isinstance(v, list | tuple) else v for v in value)
    return f"normalize({mean!r}, {std!r})"


def inherit(config: mlc.ConfigDict, train_config: Any) -> mlc.ConfigDict:
    """A copy of the evaluator config with its unset data keys and view taken from the
    pretraining config (`train_config`, a resolved config or its saved dict)."""
    train_config = mlc.ConfigDict(train_config)
    out = mlc.ConfigDict(config.to_dict())
    for key in DATA_KEYS:
        if out.data[key] is None:
            out.data[key] = train_config.data.get(key)
    if not out.view:
        out.view = default_view(train_config, out.crop_pct)
    return out


def build(config: mlc.ConfigDict, encode_fn: EncodeFn, *, mesh: jax.sharding.Mesh):
    """The evaluator of a resolved config whose data and view are set (see `inherit`)."""
    missing = [k for k in ("source", "image_size") if config.data[k] is None]
    if missing or not config.view:
        raise UserError(
            f"evaluator '{config.name}': config.data.{missing[0] if missing else 'view'} is not "
            "set; give it, or take it from the pretraining config (evaluators.inherit)"
        )
    return module(config.name).Evaluator(encode_fn, config, mesh=mesh)


def label(config: Any) -> str:
    return config.label or config.name


def backbone_encode_fn(backbone: nn.Module) -> EncodeFn:
    """encode_fn(variables, images) -> Features of a backbone in inference mode, where
    `variables` = {"params": ..., "batch_stats": ..., ...} of the backbone (a classifier
    `head` beside them, see `with_head`, is not the backbone's and is left out)."""

    def encode(variables: dict, images: jax.Array):
        own = {k: v for k, v in variables.items() if k != "head"}
        return backbone.apply(own, images, train=False)

    return encode


def backbone_variables(params: dict, model_state: dict | None = None) -> dict:
    """The backbone's variables from an objective's params and mutable collections (the
    `backbone` subtree of each)."""
    if "backbone" not in params:
        raise UserError("the parameters have no 'backbone' subtree: not a selfsup objective's")
    out = {"params": params["backbone"]}
    for collection, tree in (model_state or {}).items():
        if isinstance(tree, dict) and "backbone" in tree:
            out[collection] = tree["backbone"]
    return out


def with_head(variables: dict, params: dict) -> dict:
    """The backbone's variables plus the objective's classifier `head` params, when it has one
    (for the `classifier` evaluator; the others read the backbone's collections only)."""
    if isinstance(params, dict) and "head" in params:
        return {**variables, "head": params["head"]}
    return variables


def run_all(
    eval_configs: Sequence[Any],
    encode_fn: EncodeFn,
    params: Any,
    *,
    mesh: jax.sharding.Mesh,
    step: int,
    train_config: Any = None,
) -> dict[str, float]:
    """Run every evaluator due at `step` (`every_steps` 0, or dividing step); returns
    {"<label>/<metric>": value, "<label>/seconds": wall time}.

    Configs are resolved here; `train_config` (the pretraining config) fills unset data keys and
    views. Pass the same `encode_fn` object on every call: feature extraction then compiles once.
    """
    results: dict[str, float] = {}
    for raw in eval_configs:
        config = resolve(raw)
        if config.every_steps and step % config.every_steps:
            continue
        if train_config is not None:
            config = inherit(config, train_config)
        start = time.perf_counter()
        for name, value in build(config, encode_fn, mesh=mesh).run(params):
            results[f"{label(config)}/{name}"] = float(value)
        results[f"{label(config)}/seconds"] = time.perf_counter() - start
    return results


def build_backbone(backbone_config: Any, view: str, image_size: int):
    """(backbone, encode_fn, example): the backbone of a config's `backbone` dict in float32
    (evaluation ignores a bf16 `dtype`), its `backbone_encode_fn`, and the ShapeDtypeStruct of
    one image after `view`, [1, h, w, 3]. Equal configs give the same encode_fn (one compile)."""
    if isinstance(backbone_config, mlc.ConfigDict):
        backbone_config = backbone_config.to_dict()
    kwargs = {k: v for k, v in backbone_config.items() if k != "dtype"}
    if "name" not in kwargs:
        raise UserError(f"backbone config {kwargs} has no name (e.g. 'vit')")
    backbone, encode = _cached_backbone(json.dumps(kwargs, sort_keys=True))
    (example,) = jax.eval_shape(
        view_fn(view),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
        jax.random.key(0),
    )
    return backbone, encode, example


@functools.lru_cache(maxsize=16)
def _cached_backbone(config_json: str):
    def tuples(value):  # JSON lists back to the tuples a config holds
        return tuple(map(tuples, value)) if isinstance(value, list) else value

    kwargs = {k: tuples(v) for k, v in json.loads(config_json).items()}
    backbone = backbones.build(kwargs.pop("name"), **kwargs)
    return backbone, backbone_encode_fn(backbone)


def at_random_init(
    eval_configs: Sequence[Any],
    train_config: Any,
    *,
    mesh: jax.sharding.Mesh,
    seed: int | None = None,
) -> dict[str, float]:
    """`run_all` on the pretraining config's backbone at random initialisation (the baseline
    that pretraining must beat); seed defaults to the config's."""
    train_config = mlc.ConfigDict(train_config)
    backbone, encode, example = build_backbone(
        train_config.backbone, default_view(train_config), train_config.data.image_size
    )
    seed = train_config.get("seed", config_lib.defaults().seed) if seed is None else seed
    init = jax.jit(backbone.init, out_shardings=sharding.replicated(mesh))
    variables = init(jax.random.key(seed), jnp.zeros(example.shape, example.dtype))
    return run_all(
        eval_configs,
        encode,
        variables,
        mesh=mesh,
        step=0,
        train_config=train_config,
    )
