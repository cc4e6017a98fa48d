"""Parameter-tree path names: a leaf's key path joined by '/' ("backbone/blocks_0/attn/kernel").

The config's (regex, value) rules address parameters by these names (`param_sharding`,
`optim.no_decay`, `frozen`, `lr_mults`, ...), and checkpoints, fine-tuning and the evaluators
compare trees by them; every such name is made here.
"""

from __future__ import annotations

from typing import Any

import jax


def path_str(path: tuple) -> str:
    """A key path as one name: (DictKey("params"), DictKey("head"), SequenceKey(0)) ->
    "params/head/0"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_paths(tree: Any) -> list[str]:
    """The names of `tree`'s leaves, in flatten order."""
    return [path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def by_path(tree: Any) -> dict[str, Any]:
    """{name: leaf} for every leaf of `tree`."""
    return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
