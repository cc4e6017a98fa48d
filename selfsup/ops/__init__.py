"""The numerical building blocks every model and objective uses, each in two forms.

The reference form (plain JAX, autodiff, `jax.nn.dot_product_attention`) is what GPUs and TPUs
run; some ops also have a CPU form that XLA:CPU runs faster. `dispatch.choose` picks between
them in one place; `SELFSUP_OPS=reference` or `with forms("reference"):` forces the reference
form on CPU. Models and objectives import ops from here only, and PyTorch's default
Linear / Conv initialisation (`init.py`) too.
"""

from selfsup.ops.attention import attention
from selfsup.ops.batch_norm import BatchNorm, batch_norm
from selfsup.ops.conv import conv_general_dilated, conv_transpose_4x4_s2, max_pool
from selfsup.ops.dense import Dense, dot_general, matmul
from selfsup.ops.dispatch import CPU_FORM_SCOPE, form, forms
from selfsup.ops.gelu import gelu
from selfsup.ops.global_norm import global_norm
from selfsup.ops.init import torch_default_init, torch_default_kernel_init
from selfsup.ops.l2_normalize import l2_normalize
from selfsup.ops.layer_norm import LayerNorm, layer_norm

__all__ = [
    "CPU_FORM_SCOPE",
    "BatchNorm",
    "Dense",
    "LayerNorm",
    "attention",
    "batch_norm",
    "conv_general_dilated",
    "conv_transpose_4x4_s2",
    "dot_general",
    "form",
    "forms",
    "gelu",
    "global_norm",
    "l2_normalize",
    "layer_norm",
    "matmul",
    "max_pool",
    "torch_default_init",
    "torch_default_kernel_init",
]
