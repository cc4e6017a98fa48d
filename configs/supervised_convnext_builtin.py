"""Supervised training of ConvNeXt-atto on the built-in `shapes` dataset (the convnet baseline
of the quality benchmark, and a template for ConvNeXt fine-tuning configs).

    selfsup train --config configs/supervised_convnext_builtin.py --workdir /tmp/sup_cnx

About 6 minutes on 2 CPU cores; train accuracy (logged as `accuracy`) rises well above chance
(10%). Variant `smoke` runs a few steps of a reduced ConvNeXt-tiny in seconds. AdamW with
weight decay on conv and linear kernels only (biases, norms and layer scales are exempt, as in
the ConvNeXt recipe, which exempts every 1-D parameter); learning rate = base_lr x batch / 256.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = mlc.ConfigDict()
    c.batch_size = 64
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.data = dict(source="builtin", name="shapes", image_size=32)
    c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
    c.backbone = dict(name="convnext", variant="atto", drop_path=0.05)
    c.objective = dict(name="supervised", label_smoothing=0.1)
    c.optim = dict(
        base_lr=2e-3,
        lr_batch_divisor=256,
        warmup_steps=40,
        weight_decay=0.05,
        no_decay=(r".*/bias$", r".*/scale$", r".*/gamma$"),
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_steps = 3
        c.log_every_steps = 1
        c.backbone = dict(
            name="convnext", variant="tiny", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)
        )
        c.optim.warmup_steps = 1
    return c
