"""The one place that chooses between an op's reference form and its CPU form.

Every op in `selfsup.ops` has a reference form: plain JAX, differentiated by autodiff (and
`jax.nn.dot_product_attention` for attention). GPUs and TPUs run that form. Some ops also have
a CPU form (a hand-written backward, a conv as patch dots, an `optimization_barrier`) that
XLA:CPU runs faster; BENCHMARKS.md has the measurements.

`choose(cpu=..., reference=...)` builds an op from the two: `jax.lax.platform_dependent` keeps
the CPU form for programs lowered for CPU only, so a program lowered for `cuda` or `tpu` (on
any machine, `jax.export` included) holds the reference form alone. The CPU forms run inside a
named scope `CPU_FORM_SCOPE`, which a test finds in the CPU lowering and never in the others.

The reference form can be forced on CPU, so that tests and benchmarks run what an accelerator
runs: `SELFSUP_OPS=reference` in the environment, or `with forms("reference"):` around the code
that traces. `forms("cpu")` traces the CPU forms alone (no platform choice in the program), for
tests and benchmarks of the CPU forms themselves. Both act when a function is traced: a function
jitted and traced before keeps the form it was traced with (JAX caches the trace).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import jax

ENV = "SELFSUP_OPS"
# auto: the CPU form on CPU, the reference form elsewhere; reference: everywhere; cpu: CPU forms
# alone, whatever the platform (tests and benchmarks of the CPU forms on CPU).
FORMS = ("auto", "reference", "cpu")
CPU_FORM_SCOPE = "selfsup_cpu_form"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("selfsup_ops", default=None)


def form() -> str:
    """The form ops trace in now, one of `FORMS`."""
    value = _forced.get() or os.environ.get(ENV, "") or "auto"
    if value not in FORMS:
        raise ValueError(f"{ENV}={value!r}; choose one of {FORMS}")
    return value


@contextlib.contextmanager
def forms(name: str) -> Iterator[None]:
    """Trace every op in form `name` inside this block ("reference": what GPUs and TPUs run)."""
    if name not in FORMS:
        raise ValueError(f"form {name!r}; choose one of {FORMS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def choose(*, cpu: Callable, reference: Callable, name: str) -> Callable:
    """An op that runs `cpu` in programs lowered for CPU and `reference` everywhere else.

    Both take the same array arguments (close over static ones) and return the same values up
    to float32 rounding."""

    def cpu_form(*args):
        with jax.named_scope(f"{CPU_FORM_SCOPE}.{name}"):
            return cpu(*args)

    def op(*args):
        chosen = form()
        if chosen == "reference":
            return reference(*args)
        if chosen == "cpu":
            return cpu_form(*args)
        return jax.lax.platform_dependent(*args, cpu=cpu_form, default=reference)

    return op
