"""The global norm of a pytree, sqrt(sum of every leaf's squared entries), in float32.

- Reference form: the plain sum of squares.
- CPU form: each leaf behind an `optimization_barrier`, so that it is read once: otherwise
  XLA:CPU merges the square with the optimizer's own `g * g` and writes it out as a
  gradient-sized tensor before reducing it (BENCHMARKS.md, *Elementwise work*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfsup.ops.dispatch import choose


def global_norm(tree) -> jax.Array:
    """sqrt(sum over leaves of sum(leaf ** 2)); a float32 scalar."""
    leaves = jax.tree.leaves(tree)
    return choose(cpu=_cpu_global_norm, reference=reference_global_norm, name="global_norm")(
        *leaves
    )


def reference_global_norm(*leaves) -> jax.Array:
    squares = (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)
    return jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))


def _cpu_global_norm(*leaves) -> jax.Array:
    return reference_global_norm(*(jax.lax.optimization_barrier(x) for x in leaves))
