"""On-device view augmentations: small ops composed by spec strings, run inside the jitted step.

A view is a spec such as `"rrc(224, scale=(0.08, 1), method='bicubic')|flip|normalize"`: ops
joined by `|`, each `name` or `name(literal args)`. Every op is a factory
`op(*args, **kwargs) -> fn(images float32 [B, H, W, C], rng) -> images [B, h, w, C]`, registered
in `OPS` by `@register`, so a new op is one decorated function. Ops with per-sample
randomness split their key into B keys and vmap (see `per_sample`).

Geometry follows torchvision: `random_resized_crop` samples boxes as `RandomResizedCrop` does and
resamples them with antialiasing as crop-then-`resize(antialias=True)` does; `resize(int)` sets
the shorter side. Values stay float (no rounding to uint8, no clipping of bicubic overshoot).
The colour and filter ops (`color_jitter`, `grayscale`, `blur`, `solarize`) live in
`color.py`; every op module registers on import of this package.

Views may differ in size: SwAV's multi-crop is several specs (`multi_crop` writes them), and
asymmetric settings (BYOL's blur p 1.0 / 0.1, solarize 0 / 0.2) are simply different specs.

Modules: `registry` (specs, `register`, `build`), `geometry` (also `view_geometry`: a view's
size and normalisation), `normalization`, `color`.
"""

# Importing the op modules registers their ops.
from selfsup.augment import color, geometry, normalization  # noqa: F401
from selfsup.augment.geometry import ViewGeometry, view_geometry
from selfsup.augment.registry import OPS, build, multi_crop, parse, register

__all__ = ["OPS", "ViewGeometry", "build", "multi_crop", "parse", "register", "view_geometry"]
