"""Quickstart: MAE on a small ViT, on the built-in `shapes` dataset, on a laptop CPU.

    selfsup train --config configs/quickstart.py --workdir /tmp/qs

About 6 minutes on 2 CPU cores. The loss (MSE on per-patch normalised pixels of the masked
patches) falls from ~1.0 to ~0.5; reconstructions are in /tmp/qs/images and TensorBoard
(`tensorboard --logdir /tmp/qs`). Interrupt it with Ctrl-C and run the same command to resume.
Variant `smoke` runs a few steps in seconds.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.image_every_steps = 200
    c.data = dict(source="builtin", name="shapes", image_size=32)
    c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
    c.backbone = dict(name="vit", variant="Ti/4", depth=4)
    c.objective = dict(
        name="mae", mask_ratio=0.75, decoder_width=128, decoder_depth=2, decoder_heads=4
    )
    c.optim = dict(base_lr=1.5e-4 * 8, warmup_steps=40, weight_decay=0.05)
    if arg.smoke:
        c.batch_size = 16
        c.total_steps = 4
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.image_every_steps = 0
        c.backbone = dict(name="vit", variant="Ti/8", depth=2, width=64, num_heads=2)
        c.objective = dict(name="mae", decoder_width=32, decoder_depth=1, decoder_heads=2)
        c.optim.warmup_steps = 1
    return c
