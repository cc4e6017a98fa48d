"""selfsup.ops.dispatch: each op's CPU form is in programs lowered for CPU and never in those
lowered for `cuda` or `tpu`; the switch forces the reference form on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from selfsup import ops

DN = ("NHWC", "HWIO", "NHWC")
X4 = jnp.ones((2, 6, 6, 4))


def _batch_norm(x):
    return ops.batch_norm(x, jnp.ones(4), jnp.zeros(4), None, 1e-5, True)[0]


# op name (its CPU form's scope) -> a function of one array to differentiate
OPS = {
    "attention": (lambda x: ops.attention(x), jnp.ones((2, 5, 3, 2, 4))),
    "gelu": (ops.gelu, X4),
    "layer_norm": (lambda x: ops.layer_norm(x, jnp.ones(4), jnp.zeros(4), 1e-6), X4),
    "batch_norm": (_batch_norm, X4),
    "dot_general": (lambda x: ops.matmul(x, jnp.ones((4, 3))), X4),
    "conv": (
        lambda x: ops.conv_general_dilated(
            x, jnp.ones((1, 1, 4, 3)), (1, 1), "VALID", None, None, DN
        ),
        X4,
    ),
    "max_pool": (lambda x: ops.max_pool(x, 3, 2, 1), X4),
    "conv_transpose": (lambda x: ops.conv_transpose_4x4_s2(x, jnp.ones((4, 4, 3, 4))), X4),
    "global_norm": (lambda x: ops.global_norm({"a": x, "b": 2 * x}), X4),
}


def lowered_text(name: str, platform: str) -> str:
    fn, x = OPS[name]
    grad = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) ** 2)))
    return grad.trace(x).lower(lowering_platforms=(platform,)).as_text(debug_info=True)


@pytest.mark.parametrize("name", sorted(OPS))
def test_cpu_form_only_in_cpu_programs(name):
    scope = f"{ops.CPU_FORM_SCOPE}.{name}"
    assert scope in lowered_text(name, "cpu")
    for platform in ("cuda", "tpu"):
        text = lowered_text(name, platform)
        assert ops.CPU_FORM_SCOPE not in text, (name, platform)
        assert "optimization_barrier" not in text, (name, platform)
    with ops.forms("reference"):
        assert ops.CPU_FORM_SCOPE not in lowered_text(name, "cpu")


def test_environment_variable_forces_the_reference_form(monkeypatch):
    monkeypatch.setenv("SELFSUP_OPS", "reference")
    assert ops.form() == "reference"
    assert ops.CPU_FORM_SCOPE not in lowered_text("gelu", "cpu")
    with ops.forms("auto"):  # the context manager wins over the environment
        assert ops.CPU_FORM_SCOPE in lowered_text("gelu", "cpu")
    monkeypatch.setenv("SELFSUP_OPS", "fast")
    with pytest.raises(ValueError, match="SELFSUP_OPS='fast'"):
        ops.form()
