"""selfsup: self-supervised pretraining in JAX/Flax."""

from selfsup.host_memory import keep_freed_memory

__version__ = "0.1.0"

keep_freed_memory()  # before XLA's threads first allocate; see selfsup/host_memory.py
