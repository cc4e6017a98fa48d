"""Checksums of a checkpoint's arrays: orbax does not verify what it reads back, so every save
records these and every restore compares them (`selfsup.io.checkpoint`).

Two sums mod 2^32 over an array's bits read as unsigned words w_i: sum(w_i) and
sum(w_i * m_i) with odd m_i = (i * 0x9E3779B1) | 1 (i: the row-major index), so any one changed
word, and any swap of words, changes them. Computed on the devices (jit, any sharding, every
process gets the replicated result) when saving and resuming, and in NumPy for host restores;
both give the same bits.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfsup import pytree

PyTree = Any
_GOLDEN = 0x9E3779B1


def _words_jax(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)  # 8 bytes: [..., 2]


def _sums_jax(x: jax.Array) -> jax.Array:
    w = _words_jax(x)
    index = jnp.zeros(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):  # no reshape: stays partitioned like `x`
        index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride)
        stride = (stride * w.shape[axis]) % 2**32
    mult = (index * np.uint32(_GOLDEN)) | np.uint32(1)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * mult, dtype=jnp.uint32)])


def _sums_numpy(x: np.ndarray) -> tuple[int, int]:
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    w = x.reshape(-1).view(unsigned).astype(np.uint64)
    mult = ((np.arange(w.size, dtype=np.uint64) * _GOLDEN) | 1) & 0xFFFFFFFF
    # uint64 sums wrap mod 2^64, which keeps them exact mod 2^32.
    return int(w.sum(dtype=np.uint64) % 2**32), int((w * mult).sum(dtype=np.uint64) % 2**32)


def _hex(sums) -> str:
    return "{:08x}{:08x}".format(*(int(v) for v in sums))


@functools.cache
def _tree_sums(out_shardings):
    # One jitted function per output sharding: its cache then holds one compilation per tree.
    return jax.jit(lambda tree: jax.tree.map(_sums_jax, tree), out_shardings=out_shardings)


def on_devices(tree: PyTree) -> dict[str, str]:
    """{"/"-joined path: 16 hex digits} for every array of `tree` (global jax.Arrays, any
    sharding; every process gets the same result)."""
    out_shardings = None
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, jax.sharding.Mesh):  # replicated, so every process can read it
            out_shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            break
    sums = _tree_sums(out_shardings)(tree)
    return {k: _hex(np.asarray(v)) for k, v in pytree.by_path(jax.device_get(sums)).items()}


def on_host(tree: PyTree) -> dict[str, str]:
    """`on_devices` of a tree of host arrays, computed in NumPy."""
    return {k: _hex(_sums_numpy(np.asarray(v))) for k, v in pytree.by_path(tree).items()}
