"""Rotation prediction (RotNet) pretraining of ResNet-50 on ImageNet-1k (Gidaris et al. 2018).

    selfsup train --config configs/rotation_resnet_in1k.py --workdir gs://bucket/rotnet \
        --config.data.data_dir=/path/to/tensorflow_datasets

Each batch of 192 images is shown at the 4 rotations (768 rotated images per step), as the
paper's ImageNet setting: SGD, momentum 0.9, weight decay 5e-4, lr 0.01 x batch / 192 (the paper's
0.01 at batch 192), 30 epochs. The paper drops the lr by 10x after epochs 10, 20 and 25; here a
cosine decay (selfsup.optim has no step schedule). Views: RandomResizedCrop(224) and flip,
not normalised: the objective rotates, then normalises with ImageNet's mean and std. Expected:
the paper's RotNet (AlexNet) reaches about 38% ImageNet top-1 with linear classifiers on its
conv3/conv4 features; later ResNet-50 reproductions (Kolesnikov et al. 2019, Goyal et al. 2019)
report roughly 44-49% linear top-1, depending on the layer probed (published figures,
not reproduced with selfsup: no run at this scale here).
Needs `imagenet2012` prepared as ArrayRecord in data_dir (see README).
Variant `smoke` runs 3 steps on the built-in dataset in seconds on a CPU: the chosen variant
cut to one block per stage and 8 base channels, with the CIFAR stem (3x3/1, no max-pool), on
32-px views, batch 16 (64 rotated images), SGD at 0.1 x batch / 256.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="50", batch=192, epochs=30.0, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = arg.batch
    c.total_epochs = arg.epochs
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.compute_dtype = "bfloat16"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    # No normalize: the objective normalises after rotating.
    c.views = ("rrc(224, scale=(0.08, 1.0), method='bicubic')|flip",)
    c.backbone = dict(name="resnet", variant=arg.variant, bn_momentum=0.9)
    c.objective = dict(name="rotation", normalize="imagenet")
    c.optim = dict(
        name="sgd",
        base_lr=0.01,
        lr_batch_divisor=192,
        momentum=0.9,
        weight_decay=5e-4,
        no_decay=(r".*/bias$", r".*/scale$"),
        schedule="cosine",
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = ("rrc(32, scale=(0.35, 1.0))|flip",)
        c.backbone.update(cifar_stem=True, blocks=(1, 1, 1, 1), channels=8)
        c.optim.update(base_lr=0.1, lr_batch_divisor=256, warmup_steps=1)
    return c
