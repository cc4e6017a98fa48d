"""Supervised training of a small ViT on the built-in `shapes` dataset (the baseline of the
quality benchmark, and a template for fine-tuning configs).

    selfsup train --config configs/supervised_vit_builtin.py --workdir /tmp/sup

About 5 minutes on 2 CPU cores; train accuracy (logged as `accuracy`) rises well above chance
(10%). Variant `smoke` runs a few steps in seconds.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = mlc.ConfigDict()
    c.batch_size = 128
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.data = dict(source="builtin", name="shapes", image_size=32)
    c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
    c.backbone = dict(name="vit", variant="Ti/4", depth=4, pool="gap")
    c.objective = dict(name="supervised", label_smoothing=0.1)
    c.optim = dict(base_lr=1e-3, lr_batch_divisor=256, warmup_steps=40, weight_decay=0.05)
    if arg.smoke:
        c.batch_size = 16
        c.total_steps = 3
        c.log_every_steps = 1
        c.backbone = dict(name="vit", variant="Ti/8", depth=2, width=64, num_heads=2, pool="gap")
        c.optim.warmup_steps = 1
    return c
