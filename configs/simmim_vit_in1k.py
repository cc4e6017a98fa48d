"""SimMIM pretraining of ViT on ImageNet-1k, the official ViT-B recipe (Xie et al. 2021,
microsoft/SimMIM configs/vit_base__800ep/simmim_pretrain__vit_base__img224__800ep.yaml).

    selfsup train --config configs/simmim_vit_in1k.py:variant=B/16 --workdir gs://bucket/simmim \
        --config.data.data_dir=/path/to/tensorflow_datasets

800 epochs, batch 2048 (the README's 16 GPUs x 128), AdamW (0.9, 0.999), wd 0.05 (not on biases,
norms and the cls token; the mask token is decayed, as in the official parameter groups), base lr
1e-4 scaled by batch / 512, 10 warmup epochs, gradient clipping at 5.0, drop path 0.1, mask patch 32
at ratio 0.6, RandomResizedCrop(224, scale=(0.67, 1), bilinear) + flip. Expected: 83.8% top-1 for
ViT-B/16 after fine-tuning (paper and README; not reproduced with selfsup: no run at this scale
here); the paper's linear probe reads block 8 with average pooling. Needs `imagenet2012` prepared as
ArrayRecord in data_dir (see README, "Bring your own data").

Deviation: the official schedule holds the LR constant after warmup and multiplies it by 0.1
at epoch 700; selfsup.optim has no multi-step schedule, so this config holds it constant for all
800 epochs (schedule "constant"), and warms up from 0 rather than 5e-7 x batch / 512. See
selfsup/objectives/simmim.py for the model's deviations. Variant `smoke` shrinks it to run on a
CPU in seconds on the built-in dataset: a 2-block ViT of width 64 at patch 8, mask patch 8 on
32-px images, batch 16, 3 steps.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="B/16", smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = 2048
    c.total_epochs = 800.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.image_every_steps = 5000
    c.compute_dtype = "bfloat16"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    c.views = ("rrc(224, scale=(0.67, 1.0), method='bilinear')|flip|normalize('imagenet')",)
    # The official ViT keeps a cls token; the paper's probe averages the patch tokens.
    c.backbone = dict(name="vit", variant=arg.variant, pool="gap", drop_path=0.1)
    c.objective = dict(name="simmim", mask_patch_size=32, mask_ratio=0.6)
    c.optim = dict(
        name="adamw",
        base_lr=1e-4,
        lr_batch_divisor=512,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        # Official groups: 1-D params, biases, pos_embed, cls_token undecayed; mask_token decayed.
        no_decay=(r".*/bias$", r".*/scale$", r".*(pos_embed|cls_token).*"),
        warmup_epochs=10.0,
        schedule="constant",
        grad_clip_norm=5.0,
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = ("rrc(32, scale=(0.67, 1.0), method='bilinear')|flip|normalize('imagenet')",)
        c.backbone = dict(
            name="vit", variant="Ti/8", depth=2, width=64, num_heads=2, pool="gap", drop_path=0.1
        )
        c.objective.mask_patch_size = 8
        c.optim.warmup_epochs = 0.0
        c.optim.warmup_steps = 1
    return c
