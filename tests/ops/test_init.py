"""selfsup.ops.init: PyTorch's default Linear / Conv initialisation, U(-1/sqrt(fan_in),
1/sqrt(fan_in)): its bounds, mean and variance against the formula, in both forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup.ops import torch_default_init, torch_default_kernel_init


def check_uniform(w: jax.Array, fan_in: int) -> None:
    """w holds draws of U(-b, b), b = 1/sqrt(fan_in): within the bound, reaching it, mean 0 and
    variance b^2 / 3."""
    bound = 1.0 / math.sqrt(fan_in)
    # PyTorch: kaiming_uniform_(a=sqrt(5)) has the bound gain * sqrt(3 / fan_in), gain^2 =
    # 2 / (1 + a^2): the same bound as the bias's 1/sqrt(fan_in).
    assert math.isclose(math.sqrt(2 / (1 + 5)) * math.sqrt(3 / fan_in), bound)
    assert w.dtype == jnp.float32
    w = np.asarray(w, np.float64)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert abs(w.mean()) < 5 * bound / math.sqrt(3 * w.size)  # 5 standard errors
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.02)


@pytest.mark.parametrize("fan_in", [3, 64, 768])
def test_torch_default_init_is_uniform_within_one_over_sqrt_fan_in(fan_in):
    init = torch_default_init(fan_in)
    key = jax.random.key(fan_in)
    w = init(key, (200, 500))
    check_uniform(w, fan_in)
    # One uniform draw over [-b, b]: the values SimMIM's, SparK's and SwAV's heads start from.
    bound = 1.0 / math.sqrt(fan_in)
    want = jax.random.uniform(key, (200, 500), jnp.float32, -bound, bound)
    np.testing.assert_array_equal(w, want)


def test_kernel_form_reads_fan_in_from_the_kernel_shape():
    check_uniform(torch_default_kernel_init(jax.random.key(0), (96, 1000)), 96)
    # A conv kernel [kh, kw, in, out]: fan_in = kh * kw * in.
    check_uniform(torch_default_kernel_init(jax.random.key(1), (3, 3, 16, 4000)), 144)
