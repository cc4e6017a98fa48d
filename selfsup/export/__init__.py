"""Export a checkpoint's backbone to PyTorch: `export(workdir, out_dir)` and `load_torch(out_dir)`.

`export` reads the checkpoint's `params` and `model_state` as host NumPy (no devices), builds the
backbone from the config saved in the checkpoint (`meta["config"]["backbone"]`), and hands the
`backbone` subtrees to its family's mapping in this folder, `export_torch(model, variables) ->
(state_dict, spec)` of `selfsup/export/<family>.py` (vit.py, resnet.py, convnext.py; a keyword
`input_size=(H, W)` is passed to the ones that take it, for layouts that depend on the image size
such as ViT's position embedding). It writes:

    model.safetensors   the state dict, float32, PyTorch names and layouts
    config.json         spec ({"library", "architecture", "kwargs", "pooling"}), input_size
                        [C, H, W], mean/std (the view's normalisation, on [0, 1] pixels),
                        selfsup_version, source (workdir, step, backbone config)
    model.npz           with `npz=True`, for families with `export_npz` (ViT: big_vision
                        layout read by timm's `VisionTransformer.load_pretrained`)

`load_torch` builds the module as the README's loading snippet does, `getattr(library,
architecture)(**kwargs)` with `library` = `timm.models`, `torchvision.models`, or for "selfsup"
the PyTorch module of this folder that config.json's "module" names (`<family>_torch.py`, e.g.
`resnet_torch`: copy that one file beside your code), and loads the weights with strict=True.
`model(images)` is then the pooled embedding [N, D] for every family. Only `load_torch` and those
modules import torch.
"""

from __future__ import annotations

import importlib
import inspect
import io
import json
import os
import pkgutil
from pathlib import Path
from typing import Any

import numpy as np

from selfsup import __version__
from selfsup.errors import UserError
from selfsup.io import paths

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
NPZ = "model.npz"


def export(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    step: int | None = None,
    *,
    npz: bool = False,
) -> dict:
    """Write the backbone of `workdir`'s checkpoint `step` (latest when None) to `out_dir`.

    Returns the content of config.json. UserError for a missing or damaged checkpoint, a
    backbone family without `export_torch` (or `export_npz` with `npz`).
    """
    from selfsup import augment, backbones
    from selfsup.io import checkpoint

    trees, meta = checkpoint.restore_tree(workdir, ("params", "model_state"), step)
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("backbone"), dict):
        raise UserError(
            f"the checkpoint in {workdir} has no backbone config in its metadata: it was not "
            "written by `selfsup train`; pass the workdir of a training run"
        )
    backbone = dict(config["backbone"])
    name = backbone.pop("name", None)
    model = backbones.build(name, **backbone)
    family = backbones.family(model)
    mapping = _mapping(family)
    export_torch = getattr(mapping, "export_torch", None)
    if export_torch is None:
        raise UserError(
            f"backbone '{family}' has no PyTorch export (no export_torch in "
            f"selfsup/export/{family}.py); exportable backbones: "
            f"{', '.join(exportable()) or 'none'}"
        )
    export_npz = getattr(mapping, "export_npz", None)
    if npz and export_npz is None:
        raise UserError(f"backbone '{name}' has no .npz export; run without --npz")

    variables = _backbone_variables(trees, workdir)
    view = augment.view_geometry(config["views"][0], config["data"]["image_size"])
    extra = {"input_size": (view.height, view.width)}
    state_dict, spec = export_torch(model, variables, **_accepted(export_torch, extra))
    # Everything is mapped before anything is written: a failure leaves `out_dir` untouched.
    arrays = export_npz(model, variables, **_accepted(export_npz, extra)) if npz else None

    out = paths.path(out_dir)  # a local folder or a URL (gs://...)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the export directory {out} ({e}); pass another --out"
        ) from e
    _write_safetensors(out / WEIGHTS, state_dict)
    files = {"weights": WEIGHTS}
    if arrays is not None:
        _atomic(out / NPZ, lambda f: np.savez(f, **_float32(arrays)))
        files["npz"] = NPZ
    elif (out / NPZ).exists():
        (out / NPZ).unlink()  # from an earlier export: it would not match these weights

    record = {
        **spec,
        "input_size": [view.channels, view.height, view.width],
        "mean": list(view.mean),
        "std": list(view.std),
        "files": files,
        "selfsup_version": __version__,
        "source": {
            "workdir": str(paths.path(workdir)),
            "step": meta.get("step"),
            "backbone": config["backbone"],
        },
    }
    text = json.dumps(record, indent=2, sort_keys=True)
    _atomic(out / CONFIG, lambda f: f.write(text.encode()))
    return record


def exportable() -> list[str]:
    """Backbone families whose mapping `selfsup.export.<family>` defines `export_torch`."""
    from selfsup import backbones

    families = (info.name for info in pkgutil.iter_modules(backbones.__path__))
    return sorted(f for f in families if hasattr(_mapping(f), "export_torch"))


def _mapping(family: str) -> Any:
    """The export mapping of a backbone family, `selfsup.export.<family>`, or None."""
    try:
        return importlib.import_module(f"{__name__}.{family}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{family}":
            raise
        return None


def load_torch(out_dir: str | os.PathLike):
    """The torch.nn.Module described by `out_dir`/config.json with its weights (strict), in
    eval mode."""
    out = Path(out_dir)
    try:
        record = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{out / CONFIG} is missing or unreadable ({e}): run `selfsup export`"
        ) from e
    library, arch = record.get("library"), record.get("architecture")
    kwargs = record.get("kwargs", {})
    module = torch_library(record, where=out / CONFIG)
    if not isinstance(arch, str) or not hasattr(module, arch):
        raise UserError(f"{out / CONFIG}: {library} defines no architecture {arch!r}")
    model = getattr(module, arch)(**kwargs)
    from safetensors.torch import load_file

    weights = out / record.get("files", {}).get("weights", WEIGHTS)
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


def torch_library(record: dict, where: Any = CONFIG) -> Any:
    """The Python module whose attribute `record["architecture"]` builds the model: timm.models,
    torchvision.models, or `selfsup.export.<record["module"]>`, one of selfsup's own PyTorch
    modules (`<family>_torch`; the mappings beside them are not)."""
    library = record.get("library")
    if library in ("timm", "torchvision"):
        return _import_torch_library(library).models
    if library == "selfsup":
        name = record.get("module")
        if not isinstance(name, str) or not name.isidentifier() or not name.endswith("_torch"):
            raise UserError(
                f"{where}: library 'selfsup' needs a 'module' naming one of selfsup's PyTorch "
                f"modules (e.g. 'resnet_torch'), got {name!r}"
            )
        return importlib.import_module(f"selfsup.export.{name}")
    raise UserError(f"{where}: unknown library {library!r}; expected timm, torchvision or selfsup")


def _import_torch_library(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError) as e:
        raise UserError(
            f"loading this export needs {name} ({type(e).__name__}: {e}); install torch, "
            "torchvision and timm as matching versions (pip install -e '.[test]')"
        ) from e


def _backbone_variables(trees: dict, workdir) -> dict:
    """{"params": ..., <collection>: ...} of the `backbone` submodule, as float32 NumPy."""
    params = trees["params"]
    if not isinstance(params, dict) or "backbone" not in params:
        raise UserError(
            f"the checkpoint in {workdir} has no params/backbone: export needs an objective "
            "whose encoder submodule is named `backbone`"
        )
    variables = {"params": params["backbone"]}
    for collection, tree in trees["model_state"].items():
        if isinstance(tree, dict) and "backbone" in tree:
            variables[collection] = tree["backbone"]
    return variables


def _accepted(fn, kwargs: dict) -> dict:
    """The entries of `kwargs` that `fn` takes as keyword arguments."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _float32(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}


def _write_safetensors(path: Path, state_dict: dict) -> None:
    from safetensors.numpy import save

    data = save(_float32(state_dict), metadata={"format": "pt"})
    _atomic(path, lambda f: f.write(data))


def _atomic(path: Path, write) -> None:
    """`write(file)` into memory, then to `path` whole, so a reader never sees a partial file."""
    buffer = io.BytesIO()
    write(buffer)
    paths.write_bytes(path, buffer.getvalue())
