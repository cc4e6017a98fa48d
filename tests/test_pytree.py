"""Parameter-tree path names: dict keys, sequence indices and attribute names joined by '/'."""

import collections

import jax
import numpy as np
import optax

from selfsup import pytree


def test_names_join_every_kind_of_key():
    pair = collections.namedtuple("Pair", "x y")
    tree = {
        "params": {"head": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}},
        "stack": [np.zeros(1), (np.zeros(2),)],
        "pair": pair(np.zeros(1), np.zeros(2)),
        "opt": optax.sgd(0.1, momentum=0.9).init({"w": np.zeros(2)}),
    }
    names = [
        "opt/0/trace/w",  # optax's chain: tuple index, then the state's attribute
        "pair/x",
        "pair/y",
        "params/head/bias",
        "params/head/kernel",
        "stack/0",
        "stack/1/0",
    ]
    assert pytree.leaf_paths(tree) == names  # in flatten order
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [pytree.path_str(path) for path, _ in flat] == names
    by_path = pytree.by_path(tree)
    assert list(by_path) == names
    assert by_path["params/head/kernel"] is tree["params"]["head"]["kernel"]
