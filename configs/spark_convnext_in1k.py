"""SparK pretraining of ConvNeXt on ImageNet-1k, the paper's ConvNeXt recipe (Tian et al. 2023;
keyu-tian/SparK pretrain/utils/arg_util.py and models/__init__.py defaults).

    selfsup train --config configs/spark_convnext_in1k.py:variant=small \
        --workdir /mnt/shared/spark_cnx_s --config.data.data_dir=/path/to/tensorflow_datasets

The ResNet recipe (configs/spark_resnet_in1k.py: 1600 epochs, batch 4096, LAMB, base lr 2e-4 x batch
/ 256, 40 warmup epochs, cosine, weight decay 0.04 -> 0.2, clipping at 5, mask ratio 0.6, decoder
width 768, RandomResizedCrop(224, scale=(0.67, 1)) + flip) with the official ConvNeXt changes:
LAMB's beta2 0.999, a LayerNorm to densify, drop path 0.2 (ConvNeXt-S; base 0.3, large 0.4), and no
weight decay on the layer scales (`gamma`). Expected: 84.1% top-1 for ConvNeXt-S after ImageNet
fine-tuning (paper, official README; ConvNeXt-B: 84.8; not reproduced with selfsup: no run at this
scale here). Needs `imagenet2012` prepared as ArrayRecord in data_dir (see README, "Bring your own
data").

Deviations: the official LR warmup starts at 0.005 x the peak (ours at 0); RandomResizedCrop
cuts from images stored at 256 px. See selfsup/objectives/spark.py for the model's deviations.
Variant `smoke` shrinks it to a ConvNeXt with one block per stage and 16-32-64-128 channels
on 64-px images of the built-in dataset (a 2 x 2 grid of 32-px mask cells), decoder width 64,
a few steps on a CPU.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="small", batch=4096, drop_path=0.2, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = arg.batch
    c.total_epochs = 1600.0
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.image_every_steps = 5000
    c.compute_dtype = "float32"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    c.views = ("rrc(224, scale=(0.67, 1.0), method='bicubic')|flip|normalize('imagenet')",)
    c.backbone = dict(name="convnext", variant=arg.variant, drop_path=arg.drop_path)
    c.objective = dict(name="spark", mask_ratio=0.6, decoder_width=768, densify_norm="auto")
    peak = 2e-4 * arg.batch / 256
    c.optim = dict(
        name="lamb",
        base_lr=2e-4,
        lr_batch_divisor=256,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        weight_decay=0.04,
        weight_decay_end=0.2,
        # The official groups: 1-D parameters, biases, mask tokens and `gamma` undecayed.
        no_decay=(r".*/bias$", r".*/scale$", r".*mask_token.*", r".*/gamma$"),
        warmup_epochs=40.0,
        schedule="cosine",
        min_lr=0.001 * peak,
        grad_clip_norm=5.0,
        # The norm on the pooled output is unused by SparK (the official pretraining model has
        # none); frozen, it stays at its init for fine-tuning.
        frozen=(r"backbone/head_norm/.*",),
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.data = dict(source="builtin", name="shapes", image_size=64)
        c.views = ("rrc(64, scale=(0.67, 1.0), method='bicubic')|flip|normalize('imagenet')",)
        c.backbone = dict(
            name="convnext",
            variant="atto",
            depths=(1, 1, 1, 1),
            dims=(16, 32, 64, 128),
            drop_path=0.1,
        )
        c.objective.decoder_width = 64
        c.optim.warmup_epochs = 0.0
        c.optim.warmup_steps = 1
    return c
