"""The ResNets' conv and pool ops (`selfsup.ops.conv`): `conv_general_dilated` and `max_pool`,
values and gradients against NumPy float64 in both forms; the CPU form's paths (which shapes
become dots) and PyTorch's tie rule for the max-pool gradient."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup import ops
from selfsup.ops import conv

DN = ("NHWC", "HWIO", "NHWC")


def numpy_conv(x, k, stride: int, pad: int, g):
    """y = conv(x, k) (NHWC / HWIO, zero padding) and the gradients of sum(y * g) with respect to
    x and k, float64, from explicit patches [B, h, w, kh, kw, C]."""
    b, h, w, c = x.shape
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1

    def window(i, j):
        return np.s_[
            :, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride
        ]

    patches = np.zeros((b, oh, ow, kh, kw, c))
    for i, j in np.ndindex(kh, kw):
        patches[:, :, :, i, j] = xp[window(i, j)]
    y = np.einsum("bhwijc,ijcf->bhwf", patches, k)
    dk = np.einsum("bhwijc,bhwf->ijcf", patches, g)
    dpatches = np.einsum("bhwf,ijcf->bhwijc", g, k)
    dxp = np.zeros_like(xp)
    for i, j in np.ndindex(kh, kw):
        dxp[window(i, j)] += dpatches[:, :, :, i, j]
    return y, dxp[:, pad : pad + h, pad : pad + w], dk


@pytest.mark.parametrize(
    "batch, size, k, stride, cin, cout",
    [(2, 2, 3, 1, 3, 4), (2, 5, 1, 2, 3, 4), (2, 6, 3, 1, 3, 4), (2, 7, 3, 2, 3, 2)],
)
def test_conv_and_its_gradients_match_numpy_float64(batch, size, k, stride, cin, cout, ops_form):
    rng = np.random.default_rng(size * k + stride)
    x, w = rng.normal(size=(batch, size, size, cin)), rng.normal(size=(k, k, cin, cout))
    pad = (k - 1) // 2
    out = (size + 2 * pad - k) // stride + 1
    g = rng.normal(size=(batch, out, out, cout))
    want_y, want_dx, want_dw = numpy_conv(x, w, stride, pad, g)
    y, vjp = jax.vjp(
        lambda x, w: ops.conv_general_dilated(
            x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=DN
        ),
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
    )
    dx, dw = vjp(jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "batch, size, k, stride, cin, cout, path",
    [
        (3, 2, 3, 1, 5, 4, "dot"),  # k x k on a map under 3 x 3: patches @ kernel
        (3, 1, 3, 1, 5, 4, "dot"),
        (3, 2, 3, 2, 5, 4, "dot"),
        (3, 2, 7, 2, 5, 4, "dot"),
        (3, 4, 3, 2, 5, 4, "dot"),  # output 2 x 2
        (3, 5, 1, 1, 5, 4, "dot"),  # 1 x 1: input @ kernel
        (3, 5, 1, 2, 5, 4, "dot"),
        (3, 6, 3, 1, 5, 4, "xla"),  # left to XLA's convolution
        (8, 32, 3, 1, 5, 4, "dot_kernel_grad"),  # 8192 output positions: kernel gradient a dot
        (8, 64, 7, 2, 3, 8, "dot_kernel_grad"),  # the stem's shape
        (7, 32, 3, 1, 5, 4, "xla"),  # 7168 positions
    ],
)
def test_cpu_conv_equals_xla_and_takes_its_path(batch, size, k, stride, cin, cout, path):
    rng = np.random.default_rng(size * k + stride)
    x = rng.normal(size=(batch, size, size, cin))
    w = rng.normal(size=(k, k, cin, cout))
    p = (k - 1) // 2
    args = ((stride, stride), ((p, p), (p, p)))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, DN)

    def loss(conv, x, w):
        y = conv(x, w, *args, dimension_numbers=dn)
        return (y * y).sum(), y

    x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    (_, want), want_grads = jax.value_and_grad(
        functools.partial(loss, jax.lax.conv_general_dilated), (0, 1), has_aux=True
    )(x32, w32)
    cpu_conv = functools.partial(loss, conv.conv_general_dilated)
    with ops.forms("cpu"):
        fast = jax.value_and_grad(cpu_conv, (0, 1), has_aux=True)
        (_, got), got_grads = fast(x32, w32)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    for g, h in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5 * np.abs(h).max())
    # The forward and backward programs hold a convolution only where XLA is left to do it; the
    # kernel gradient alone needs the forward conv and, from XLA, a second one.
    with ops.forms("cpu"):
        jaxpr = str(jax.make_jaxpr(fast)(x32, w32))
        kernel_grad = jax.jit(jax.grad(lambda w: cpu_conv(x32, w)[0]))
        convs = kernel_grad.lower(w32).compile().as_text().count(" convolution(")
    assert ("conv_general_dilated" in jaxpr) is (path != "dot")
    assert convs == {"dot": 0, "dot_kernel_grad": 1, "xla": 2}[path]


def numpy_max_pool(x: np.ndarray, g: np.ndarray, k: int, s: int, p: int):
    """Max-pool of x (padded by p with -inf) and the gradient of sum(pool * g), float64: each
    window's gradient goes to its first maximum in row-major order (PyTorch's rule)."""
    b, h, w, c = x.shape
    padded = np.full((b, h + 2 * p, w + 2 * p, c), -np.inf)
    padded[:, p : p + h, p : p + w] = x
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    out, grad = np.zeros((b, oh, ow, c)), np.zeros_like(padded)
    for n, i, j, ch in np.ndindex(b, oh, ow, c):
        window = padded[n, i * s : i * s + k, j * s : j * s + k, ch]
        first = np.unravel_index(np.argmax(window), window.shape)  # argmax: first of ties
        out[n, i, j, ch] = window[first]
        grad[n, i * s + first[0], j * s + first[1], ch] += g[n, i, j, ch]
    return out, grad[:, p : p + h, p : p + w]


@pytest.mark.parametrize("size, k, s, p", [(8, 3, 2, 1), (7, 3, 2, 1), (6, 2, 2, 0), (5, 3, 1, 1)])
def test_max_pool_and_its_gradient_match_numpy(size, k, s, p, ops_form):
    rng = np.random.default_rng(size + k)
    if ops_form == "cpu":
        # Small integers (ties in most windows, as ReLU's zeros and flat image regions give):
        # the CPU form sends a tie's gradient to its first maximum, as PyTorch does.
        x = rng.integers(-2, 3, (2, size, size, 3)).astype(np.float64)
    else:  # XLA's reduce-window gradient has its own tie rule: checked without ties
        x = rng.permutation(2 * size * size * 3).reshape(2, size, size, 3).astype(np.float64)
    out = (size + 2 * p - k) // s + 1
    g = rng.normal(size=(2, out, out, 3))
    want, want_grad = numpy_max_pool(x, g, k, s, p)
    got, vjp = jax.vjp(lambda v: conv.max_pool(v, k, s, p), jnp.asarray(x, jnp.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(vjp(jnp.asarray(g, jnp.float32))[0], want_grad, rtol=1e-5, atol=1e-6)
    # The forward equals Linen's reduce-window pool.
    linen = nn.max_pool(jnp.asarray(x, jnp.float32), (k, k), (s, s), ((p, p), (p, p)))
    np.testing.assert_array_equal(got, linen)


def test_cpu_conv_leaves_a_kernel_gradient_past_the_patches_cap_to_xla(monkeypatch):
    x, w = jnp.ones((8, 32, 32, 5)), jnp.ones((3, 3, 5, 4))

    def convs_in_kernel_grad() -> int:
        def loss(w):
            args = ((1, 1), ((1, 1), (1, 1)))
            return conv.conv_general_dilated(x, w, *args, dimension_numbers=DN).sum()

        with ops.forms("cpu"):
            return jax.jit(jax.grad(loss)).lower(w).compile().as_text().count(" convolution(")

    assert convs_in_kernel_grad() == 0  # a dot (the sum's gradient needs no forward conv)
    # One byte under the patches: 8192 positions x 3 x 3 x 5 channels x 4 bytes.
    monkeypatch.setattr(conv, "PATCHES_MAX_BYTES", 8192 * 9 * 5 * 4 - 1)
    assert convs_in_kernel_grad() == 1
