"""Attentive probe (AIM's protocol) of a checkpoint's frozen ViT: BatchNorm without affine over
the mean of the last blocks' patch tokens, one learned query with multi-head cross-attention,
a linear classifier; trained with AdamW on cached tokens, the best of 3 learning rates chosen
on 10% of the training split, refit, and test top-1/top-5 written to
/tmp/qs/eval/attentive_probe_step<N>.json.

    selfsup eval --workdir /tmp/qs --config configs/eval/attentive_probe.py:blocks=4

AIM averages the last 6 blocks; `blocks=<k>` sets k (the quickstart's ViT has 4 blocks). The
tokens of every image are cached in host memory (20000 x 64 x 96 floats, 0.5 GB, for the
quickstart); `train_limit` subsamples larger datasets. Compare with the linear probe of the same
checkpoint and with the backbone at random initialisation (`--random-init`).
Variant `smoke`: 256 + 128 images, 5 epochs (seconds).
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, blocks=6)
    c = mlc.ConfigDict()
    c.name = "attentive_probe"
    c.features = f"last_{arg.blocks}_blocks"
    c.num_heads = 0  # D / 64
    c.learning_rates = (3e-4, 1e-3, 3e-3)
    c.weight_decays = (0.05,)
    c.epochs = 30
    c.warmup_epochs = 3
    c.probe_batch_size = 256
    c.val_fraction = 0.1
    if arg.smoke:
        c.train_limit = 256
        c.test_limit = 128
        c.batch_size = 64
        c.epochs = 5
        c.warmup_epochs = 1
        c.probe_batch_size = 64
        c.learning_rates = (1e-3,)
    return c
