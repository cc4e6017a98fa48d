"""Linear probe (MAE's protocol) of a checkpoint's frozen backbone.

    selfsup eval --workdir /tmp/qs --config configs/eval/linear_probe.py

Extracts the pooled feature (the patch-token mean for the quickstart's ViT) on the checkpoint's
dataset (train split to fit, test split to report), standardises it (BatchNorm without affine),
trains a grid of 4 learning rates x 2 weight decays of linear heads at once with SGD, picks the
best on 10% of the training split, refits it on the whole split and writes test top-1/top-5 to
/tmp/qs/eval/linear_probe_step<N>.json. The result to compare with is the same backbone at
random initialisation (`--random-init`); chance is 1 / number of classes.
Variants: `smoke` (256 + 128 images, 10 epochs: seconds), `block=<i>` (the average of block i's
patch tokens instead of the pooled feature).
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, block=-1)
    c = mlc.ConfigDict()
    c.name = "linear_probe"
    c.features = "pooled" if arg.block < 0 else f"block_{arg.block}"
    c.batch_norm = True
    c.learning_rates = (0.01, 0.03, 0.1, 0.3)
    c.weight_decays = (0.0, 1e-4)
    c.epochs = 90
    c.warmup_epochs = 10
    c.probe_batch_size = 256
    c.val_fraction = 0.1
    if arg.smoke:
        c.train_limit = 256
        c.test_limit = 128
        c.batch_size = 64
        c.epochs = 10
        c.warmup_epochs = 1
        c.probe_batch_size = 64
        c.learning_rates = (0.03, 0.3)
        c.weight_decays = (0.0,)
    return c
