"""Random ResNet variables and images, and parameter counts, for the backbone and export tests."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from selfsup.backbones import resnet


@functools.cache
def abstract_variables(variant: str) -> dict:
    """Shapes of a Model's variables (they do not depend on the image size)."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    return jax.eval_shape(resnet.Model(variant=variant).init, jax.random.key(0), x)


def randomize(shapes: dict, seed: int = 0) -> dict:
    """Random values for variables of these shapes: BatchNorm scales, biases and running
    statistics far from their init (1, 0, 0, 1), so an export that drops or swaps one of them
    fails. Each residual branch's last BN scale is kept small (as after zero-init training) so
    activations stay O(1) through depth and float32 results stay comparable."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        names = ["", "", *(getattr(p, "key", "") for p in path)]
        if names[-1] == "kernel":  # He-normal over fan_in
            std = math.sqrt(2.0 / np.prod(s.shape[:-1]))
            return rng.standard_normal(s.shape, np.float32) * np.float32(std)
        if names[-1] == "scale" and names[-3].startswith("layer"):
            last = "bn3" if "bn3" in shapes["params"][names[-3]] else "bn2"
            if names[-2] == last:
                return rng.uniform(0.1, 0.3, s.shape).astype(np.float32)
        if names[-1] in ("scale", "var"):
            return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
        return rng.normal(0.0, 0.3, s.shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(fill, shapes)


def images(size: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def count(variant: str) -> int:
    params = abstract_variables(variant)["params"]
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
