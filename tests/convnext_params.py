"""A small ConvNeXt, random parameters and images for the backbone and export tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

B, IMG = 2, 64  # 64 px: a 2x2 grid of stride-32 cells, so masks have kept and masked cells
SMALL = dict(variant="tiny", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128))


def random_params(model, seed=0):
    """Random host parameters with `model`'s tree: kernels normal(0.02), and biases, norm
    scales and layer scales moved well away from their init (0, 1, 1e-6) so each one matters."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape)
        value = {"kernel": 0.02 * noise, "bias": 0.1 * noise, "scale": 1.0 + 0.3 * noise}
        return value.get(name, 0.5 * noise).astype(np.float32)  # gamma: N(0, 0.5^2)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def images(seed=0, b=B, size=IMG):
    return np.asarray(jax.random.normal(jax.random.key(seed), (b, size, size, 3)))
