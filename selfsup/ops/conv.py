"""Convolutions and pooling (NHWC / HWIO) for the ResNets and SparK's decoder.

`conv_general_dilated` is a drop-in `lax.conv_general_dilated` for `nn.Conv`;
`conv_transpose_4x4_s2` is PyTorch's ConvTranspose2d(4, 2, 1); `max_pool` is PyTorch's
`max_pool2d`. Their reference forms are XLA's conv, transposed conv and reduce-window max with
autodiff. Their CPU forms give the same values (up to float32 summation order) as dots that
XLA:CPU runs faster than its convs; BENCHMARKS.md (*ResNet convs*, *2-D dots*, *Convs on
XLA:CPU*) has the measurements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from selfsup.ops.dense import flat_matmul
from selfsup.ops.dispatch import choose

# A k x k conv with at least this many output positions (B * h * w, of the global batch) takes
# its kernel gradient as a dot on CPU, while its patches stay under PATCHES_MAX_BYTES.
DOT_KERNEL_GRAD_POSITIONS = 8192
PATCHES_MAX_BYTES = 1 << 30


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`, the reference form; the CPU form is `_cpu_conv`."""
    dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
    plain = (
        not isinstance(padding, str)
        and not dilated
        and feature_group_count == 1
        and _is_nhwc_hwio(dimension_numbers)
    )

    def reference(lhs, rhs):
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )

    def cpu(lhs, rhs):
        if not plain:
            return reference(lhs, rhs)
        return _cpu_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type)

    return choose(cpu=cpu, reference=reference, name="conv")(lhs, rhs)


def _cpu_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type):
    """`lax.conv_general_dilated` for NHWC / HWIO, computed as a dot where XLA:CPU's conv is slow:

    - a 1x1 conv as (strided) input @ kernel: its kernel gradient is then a dot over batch and
      space, not a conv that XLA:CPU runs after transposing both operands (BENCHMARKS.md,
      *ResNet convs*);
    - a k x k conv whose input or output map is under 3 x 3 as patches @ kernel, the patches
      cut by k x k strided slices: XLA:CPU lowers those convs and their gradients to a slow
      generic path, which every ResNet at 32-64 px hits (*ResNet convs*);
    - any other k x k conv with at least `DOT_KERNEL_GRAD_POSITIONS` output positions as XLA's
      conv, but its kernel gradient as patches^T @ output gradient (a ResNet's stem and first
      stage at 64 px, SparK's decoder; the patches, k * k times the input, up to
      `PATCHES_MAX_BYTES`): XLA:CPU transposes both operands into a conv over the batch that
      runs far below its matmuls' speed on these shapes (*ResNet convs*); with fewer positions,
      XLA's is as fast or faster.

    The same values either way (up to float32 summation order); other convs go to XLA as they
    are. lhs [B, H, W, cin], rhs [kh, kw, cin, cout], padding ((lo, hi), (lo, hi)).
    """
    kh, kw, cin, cout = rhs.shape
    out = [
        (n + lo + hi - k) // s + 1
        for n, (lo, hi), k, s in zip(lhs.shape[1:3], padding, (kh, kw), window_strides, strict=True)
    ]
    if (kh, kw) == (1, 1) or min(*lhs.shape[1:3], *out) < 3:
        # [B, out_h, out_w, cin] per kernel offset (i, j), in HWIO's order
        cols, _ = _window_views(lhs, (kh, kw), window_strides, padding, 0.0)
        patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
        return flat_matmul(  # as [B * out_h * out_w, k * k * cin] @ [k * k * cin, cout]
            patches,
            rhs.reshape(kh * kw * cin, cout),
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    strides, pads = tuple(window_strides), tuple(map(tuple, padding))
    positions = lhs.shape[0] * out[0] * out[1]
    patches_bytes = positions * kh * kw * cin * lhs.dtype.itemsize
    if positions >= DOT_KERNEL_GRAD_POSITIONS and patches_bytes <= PATCHES_MAX_BYTES:
        return _dot_kernel_grad_conv(lhs, rhs, strides, pads, precision, preferred_element_type)
    return _xla_conv(lhs, rhs, strides, pads, precision, preferred_element_type)


def _xla_conv(lhs, rhs, strides, padding, precision, preferred_element_type):
    """XLA's NHWC / HWIO convolution."""
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dot_kernel_grad_conv(lhs, rhs, strides, padding, precision, preferred_element_type):
    """XLA's conv whose kernel gradient is `_patches_kernel_grad`."""
    return _xla_conv(lhs, rhs, strides, padding, precision, preferred_element_type)


def _dot_kernel_grad_conv_fwd(lhs, rhs, *args):
    return _dot_kernel_grad_conv(lhs, rhs, *args), (lhs, rhs)


def _dot_kernel_grad_conv_bwd(strides, padding, precision, preferred_element_type, residuals, g):
    lhs, rhs = residuals
    args = (strides, padding, precision, preferred_element_type)
    d_lhs = jax.vjp(lambda x: _xla_conv(x, rhs, *args), lhs)[1](g)[0]
    d_rhs = _patches_kernel_grad(lhs, g, rhs.shape[:2], strides, padding, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


_dot_kernel_grad_conv.defvjp(_dot_kernel_grad_conv_fwd, _dot_kernel_grad_conv_bwd)


def _patches_kernel_grad(lhs, g, window, strides, padding, precision) -> jax.Array:
    """The kernel gradient of a conv of lhs [B, H, W, cin] with output gradient g [B, h, w, cout]:
    patches^T [kh * kw * cin, B * h * w] @ g [B * h * w, cout] -> [kh, kw, cin, cout], float32.

    The patches are cut from lhs transposed to [cin, B, H, W], so that they come out with the
    contracted positions last: a plain row-major dot, which XLA:CPU's YNNPACK takes (it runs a
    dot with the contraction on the lhs's rows on a slower path)."""
    (kh, kw), (sh, sw), (oh, ow) = window, strides, g.shape[1:3]
    x = jnp.pad(jnp.transpose(lhs, (3, 0, 1, 2)), ((0, 0), (0, 0), *padding))
    rows = [
        x[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.stack(rows).reshape(kh * kw * lhs.shape[-1], -1)
    grad = jnp.dot(
        patches, g.reshape(-1, g.shape[-1]), precision=precision, preferred_element_type=jnp.float32
    )
    return grad.reshape(kh, kw, lhs.shape[-1], g.shape[-1])


def _is_nhwc_hwio(dimension_numbers) -> bool:
    """Whether lax dimension numbers say NHWC input, HWIO kernel, NHWC output (Flax's)."""
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
        return tuple(dimension_numbers) == ("NHWC", "HWIO", "NHWC")
    lhs, rhs, out = dimension_numbers  # lax.ConvDimensionNumbers: axis indices
    return tuple(lhs) == (0, 3, 1, 2) and tuple(rhs) == (3, 2, 0, 1) and tuple(out) == (0, 3, 1, 2)


def _window_views(x: jax.Array, window, strides, padding, value: float) -> tuple[list, tuple]:
    """The kh * kw strided views [B, out_h, out_w, C] of x padded by `padding` ((lo, hi) per
    spatial axis) with `value`, one per window offset in row-major order, and the padded shape."""
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=value)
    (kh, kw), (sh, sw) = window, strides
    oh, ow = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    views = [
        padded[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return views, padded.shape


def _pool_windows(x: jax.Array, k: int, s: int, p: int) -> tuple[list, tuple]:
    """`_window_views` of a k x k window of stride s, padded by p with -inf."""
    return _window_views(x, (k, k), (s, s), ((p, p), (p, p)), -jnp.inf)


def max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
    """k x k max-pool of stride s, padded by p with -inf: [B, H, W, C] -> [B, H', W', C].

    Reference form: XLA's reduce-window max and autodiff. CPU form: the elementwise maximum of
    the k * k window views, its gradient going to the first maximum of each window in row-major
    order as PyTorch's does; XLA:CPU runs the reference form's gradient as a reduce-window over
    index arrays (BENCHMARKS.md, *2-D dots*).
    """
    return choose(
        cpu=lambda x: _cpu_max_pool(x, k, s, p),
        reference=lambda x: reference_max_pool(x, k, s, p),
        name="max_pool",
    )(x)


def reference_max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
    pad = ((0, 0), (p, p), (p, p), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, k, k, 1), (1, s, s, 1), pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cpu_max_pool(x: jax.Array, k: int, s: int, p: int) -> jax.Array:
    return functools.reduce(jnp.maximum, _pool_windows(x, k, s, p)[0])


def _max_pool_fwd(x, k, s, p):
    out = _cpu_max_pool(x, k, s, p)
    return out, (x, out)


def _max_pool_bwd(k, s, p, residuals, g):
    x, out = residuals
    views, padded_shape = _pool_windows(x, k, s, p)
    taken = jnp.zeros(out.shape, bool)
    grad = jnp.zeros(padded_shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for n, view in enumerate(views):
        first = (view == out) & ~taken
        taken = taken | first
        i, j = divmod(n, k)
        # Each output cell's share back at its window offset: interior padding s - 1 strides it.
        hi_h = padded_shape[1] - i - (s * (out.shape[1] - 1) + 1)
        hi_w = padded_shape[2] - j - (s * (out.shape[2] - 1) + 1)
        grad = grad + jax.lax.pad(
            jnp.where(first, g, zero),
            zero,
            ((0, 0, 0), (i, hi_h, s - 1), (j, hi_w, s - 1), (0, 0, 0)),
        )
    h, w = x.shape[1:3]
    return (grad[:, p : p + h, p : p + w],)


_cpu_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# ConvTranspose2d(k=4, s=2, p=1): output row 2y + a sums input rows y + d through kernel row
# a + 1 - 2d, for the two d of its phase a (the same for columns): phase -> ((d, kernel row), ...).
_PHASE_TAPS = {0: ((-1, 3), (0, 1)), 1: ((0, 2), (1, 0))}


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1), no bias: x [B, H, W, C] and
    kernel [4, 4, F, C] (kernel[ky, kx, f, c] = PyTorch's weight[c, f, ky, kx]) -> [B, 2H, 2W, F].

    Reference form: XLA's transposed conv and autodiff. CPU form: four phase convs, one per
    output pixel parity (a, b): each is 2 x 2 taps of the input, one patches [B * H * W, 4C] @
    kernel [4C, F] dot, and the phases are interleaved. XLA:CPU runs the stride-dilated conv and
    its kernel gradient on a slow generic path (BENCHMARKS.md, *Convs on XLA:CPU*); the phases'
    patches are 16 times the input, which accelerators need not pay."""
    return choose(
        cpu=_phase_dots, reference=reference_conv_transpose_4x4_s2, name="conv_transpose"
    )(x, kernel)


def reference_conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # `transpose_kernel` flips the kernel in space and swaps its F and C axes (HWIO's I and O);
    # the stride-2 dilated input is padded by k - 1 - p = 2 per side.
    return jax.lax.conv_transpose(
        x,
        kernel,
        (2, 2),
        ((2, 2), (2, 2)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        transpose_kernel=True,
    )


def _phase_dots(x: jax.Array, kernel: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for row_phase in (0, 1):
        row = []
        for col_phase in (0, 1):
            taps = [
                (dy, ky, dx, kx)
                for dy, ky in _PHASE_TAPS[row_phase]
                for dx, kx in _PHASE_TAPS[col_phase]
            ]
            views = [padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, _, dx, _ in taps]
            taps_kernel = jnp.concatenate([kernel[ky, kx].T for _, ky, _, kx in taps])  # [4C, F]
            row.append(flat_matmul(jnp.concatenate(views, axis=-1), taps_kernel))
        rows.append(jnp.stack(row, axis=3))  # [B, H, W, 2 (column phase), F]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, -1)  # [B, H, 2, W, 2, F] interleaved
