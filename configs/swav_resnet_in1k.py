"""SwAV pretraining of ResNet-50 on ImageNet-1k (Caron et al. 2020; facebookresearch/swav
main_swav.py and scripts/swav_800ep_pretrain.sh).

    selfsup train --config configs/swav_resnet_in1k.py --workdir gs://bucket/swav \
        --config.data.data_dir=/path/to/tensorflow_datasets

Batch 4096, 800 epochs, multi-crop 2 x 224 (scale 0.14-1) + 6 x 96 (scale 0.05-0.14), each with
flip, colour jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2, Gaussian blur p 0.5 and ImageNet
normalisation; head 2048-2048-128, 3000 prototypes frozen for the first epoch (313 steps at
batch 4096), temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations. LARS (momentum 0.9,
trust coefficient 0.001, weight decay 1e-6 on every parameter) at lr 4.8 (= 4.8 x batch / 4096),
10 warmup epochs, cosine to 0.0048. Expected: 75.3% linear-eval top-1 (the paper's figure at
800 epochs, not reproduced with selfsup: no run at this scale here).
Variant `batch=256` adds the official small-batch queue (3840 embeddings, from epoch 15); the
official 256-batch recipe also uses lr 0.6 (`--config.optim.base_lr=9.6`, scaled by 256 / 4096).
Needs `imagenet2012` prepared as ArrayRecord in data_dir (see README, "Bring your own data").

Deviations: the official warmup starts at lr 0.3, here at 0; the official LARC divides by
||g|| + wd ||w|| where selfsup's LARS divides by ||g + wd w||; the blur kernel is 10% of the
image side (selfsup.augment.color). Variant `smoke` trains the chosen variant cut to one block per
stage and 8 base channels, with the CIFAR stem (3x3/1, no max-pool), on 2 x 32 + 2 x 16 crops of
the built-in dataset with 30 prototypes and the queue on, in seconds on a CPU.
"""

import math

import ml_collections as mlc

from selfsup.augment import multi_crop
from selfsup.config import parse_arg

IMAGENET_TRAIN = 1281167


def views(global_size: int, local_size: int, n_local: int) -> list[str]:
    """2 global + `n_local` local crop specs (SwAV's augmentations)."""
    colour = "|flip|color_jitter(0.8, 0.8, 0.8, 0.2, p=0.8)|grayscale(0.2)"
    colour += "|blur(0.5, sigma=(0.1, 2.0))|normalize('imagenet')"
    return multi_crop(
        f"rrc({global_size}, scale=(0.14, 1.0), method='bicubic'){colour}",
        f"rrc({local_size}, scale=(0.05, 0.14), method='bicubic'){colour}",
        2,
        n_local,
    )


def get_config(arg=None):
    arg = parse_arg(arg, variant="50", batch=4096, epochs=800.0, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = arg.batch
    c.total_epochs = arg.epochs
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.compute_dtype = "bfloat16"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    c.views = tuple(views(224, 96, 6))
    c.backbone = dict(name="resnet", variant=arg.variant, bn_momentum=0.9)
    steps_per_epoch = math.ceil(IMAGENET_TRAIN / arg.batch)
    c.objective = dict(
        name="swav",
        num_views=8,
        crops_for_assign=(0, 1),
        num_prototypes=3000,
        proj_dim=128,
        temperature=0.1,
        epsilon=0.05,
        sinkhorn_iterations=3,
        # The official queue for batches under 4096: 3840 embeddings from epoch 15.
        queue_length=3840 if arg.batch < 4096 else 0,
        queue_start_step=15 * steps_per_epoch if arg.batch < 4096 else 0,
    )
    c.optim = dict(
        name="lars",
        base_lr=4.8,
        lr_batch_divisor=4096,
        momentum=0.9,
        trust_coefficient=0.001,
        weight_decay=1e-6,
        no_decay=(),
        lars_exclude=(),
        warmup_epochs=10.0,
        schedule="cosine",
        min_lr=0.0048 * arg.batch / 4096,
        frozen_until=(("prototypes", steps_per_epoch),),
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = tuple(views(32, 16, 2))
        c.backbone.update(cifar_stem=True, blocks=(1, 1, 1, 1), channels=8)
        c.objective.update(
            num_views=4,
            num_prototypes=30,
            proj_hidden=64,
            proj_dim=16,
            queue_length=16,
            queue_start_step=1,
        )
        c.optim.update(warmup_epochs=0.0, min_lr=0.0, frozen_until=(("prototypes", 2),))
        c.optim.warmup_steps = 1
    return c
