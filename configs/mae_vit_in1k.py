"""MAE pretraining of ViT on ImageNet-1k, the recipe of He et al. 2021 (Table 8 / A.1).

    selfsup train --config configs/mae_vit_in1k.py:variant=B/16 --workdir /mnt/shared/mae_b16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

1600 epochs, batch 4096, AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4 scaled by batch / 256,
40 warmup epochs then cosine, mask ratio 0.75, norm_pix_loss, RandomResizedCrop(0.2, 1) +
flip. Expected: 68.0% linear probe / 83.6% fine-tuned top-1 for ViT-B/16 (the paper's figures,
not reproduced with selfsup: no run at this scale here). Needs
`imagenet2012` prepared as ArrayRecord in data_dir (see README, "Bring your own data").
Variant `smoke` shrinks it to run on a CPU in seconds on the built-in dataset: a 2-block ViT of
width 64 at patch 8 on 32-px images, a 1-block decoder of width 32, batch 16, 3 steps.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="B/16", smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = 4096
    c.total_epochs = 1600.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.image_every_steps = 5000
    c.compute_dtype = "bfloat16"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    c.views = ("rrc(224, scale=(0.2, 1.0), method='bicubic')|flip|normalize('imagenet')",)
    c.backbone = dict(name="vit", variant=arg.variant)
    c.objective = dict(
        name="mae",
        mask_ratio=0.75,
        decoder_width=512,
        decoder_depth=8,
        decoder_heads=16,
        norm_pix_loss=True,
    )
    c.optim = dict(
        name="adamw",
        base_lr=1.5e-4,
        lr_batch_divisor=256,
        b1=0.9,
        b2=0.95,
        weight_decay=0.05,
        warmup_epochs=40.0,
        schedule="cosine",
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = ("rrc(32, scale=(0.2, 1.0), method='bicubic')|flip|normalize('imagenet')",)
        c.backbone = dict(name="vit", variant="Ti/8", depth=2, width=64, num_heads=2)
        c.objective.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
        c.optim.warmup_epochs = 0.0
        c.optim.warmup_steps = 1
    return c
