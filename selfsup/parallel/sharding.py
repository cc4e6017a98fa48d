"""The device mesh, and the rules that place every array of the training state on it.

One mesh with named axes `data` and `fsdp` (Auto axis types: JAX's default Explicit mode rejects
ordinary GSPMD code). The batch is split over both axes; parameters (and the optimizer state that
mirrors them) are placed by `(regex, placement)` rules over '/'-joined paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from selfsup import pytree
from selfsup.errors import UserError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every axis


def make_mesh(
    shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A mesh over all devices from `{"data": -1, "fsdp": 8}`-style sizes (-1: what remains)."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(AXES)
    if unknown:
        raise UserError(f"config.mesh: unknown axis '{sorted(unknown)[0]}'; axes are {AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in AXES]
    if sizes.count(-1) > 1:
        raise UserError("config.mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"config.mesh: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(
            f"config.mesh {dict(zip(AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are present; use -1 for one axis to take the rest"
        )
    return jax.make_mesh(
        tuple(sizes),
        AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
        devices=devices,
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """Shard the largest dimension divisible by `fsdp_size` over `fsdp`; replicate if none is."""
    if fsdp_size <= 1:
        return PartitionSpec()
    candidates = [(dim, i) for i, dim in enumerate(shape) if dim % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) from the rules.

    A rule's placement is "fsdp", "replicate", or a tuple PartitionSpec such as (None, "fsdp").
    """
    compiled = [(re.compile(pattern), placement) for pattern, placement in rules]
    fsdp_size = mesh.shape["fsdp"]

    def place(path, leaf):
        shape = np.shape(leaf)
        name = pytree.path_str(path)
        placement = next((pl for pattern, pl in compiled if pattern.fullmatch(name)), "replicate")
        if placement == "fsdp":
            spec = fsdp_spec(shape, fsdp_size)
        elif placement == "replicate":
            spec = PartitionSpec()
        else:
            spec = PartitionSpec(*placement)
            if len(spec) > len(shape):
                raise UserError(
                    f"config.param_sharding: spec {placement} has more dims than {name}"
                )
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(place, tree)


def bytes_per_device(tree: Any) -> int:
    """Bytes of `tree` held on one device, read from the arrays' shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard_shape) * leaf.dtype.itemsize
    return total
