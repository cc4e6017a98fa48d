"""Supervised training of a small ViT on the built-in `shapes` dataset: a ViT baseline on the
built-in data, and a template for fine-tuning configs.

    selfsup train --config configs/supervised_vit_builtin.py --workdir /tmp/sup

ViT-Ti/4 (width 192, 3 heads) cut to 4 blocks, the mean of the patch tokens as the feature, on
32-px crops (RandomResizedCrop(32, scale 0.35-1) + flip, ImageNet normalisation), batch 128, 400
steps, cross-entropy with label smoothing 0.1. AdamW (0.9, 0.95) at lr 1e-3 x batch / 256 =
5e-4, 40 warmup steps then cosine to 0, weight decay 0.05 except on biases, norms, the position
embedding and the cls token. Measured (2026-12-07, 22 minutes on 2 heavily shared CPU cores):
train accuracy (logged as `accuracy`, on the augmented batches) 62-67% over the last 40 steps,
loss 1.26; k-NN top-1 75.5% on the test split (`selfsup eval --workdir /tmp/sup --config
configs/eval/knn.py`; chance is 10%). Variant `smoke` runs 3 steps of a 2-block ViT of width 64
at patch 8, batch 16, in seconds.
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
