"""SparK pretraining of ResNet on ImageNet-1k, the paper's ResNet-50 recipe (Tian et al. 2023;
keyu-tian/SparK pretrain/utils/arg_util.py defaults).

    selfsup train --config configs/spark_resnet_in1k.py:variant=50 --workdir /mnt/shared/spark_r50 \
        --config.data.data_dir=/path/to/tensorflow_datasets

1600 epochs, batch 4096, LAMB (0.9, 0.95, eps 1e-6; the trust ratio on weight-decayed parameters
only, as timm's Lamb), global gradient-norm clipping at 5, base lr 2e-4 scaled by batch / 256, 40
warmup epochs then cosine to 0.001 x the peak, weight decay following a cosine from 0.04 to 0.2
(none on biases, norms and mask tokens), mask ratio 0.6 on the stride-32 grid, decoder width 768, a
sparse BatchNorm to densify, RandomResizedCrop(224, scale=(0.67, 1), bicubic) + flip, float32 as the
official code. Expected: 80.6% top-1 for ResNet-50 after ImageNet fine-tuning (paper, official
README; ResNet-101: 82.2; not reproduced with selfsup: no run at this scale here). Needs
`imagenet2012` prepared as ArrayRecord in data_dir (see README, "Bring your own data"). `batch=N`
changes the batch with the learning rates scaled.

Deviations: the official LR warmup starts at 0.005 x the peak (ours at 0); our ResNet has no
stochastic depth (the official ResNet-50 uses timm's drop_path_rate 0.05); RandomResizedCrop
cuts from images stored at 256 px (shorter side), not from the full-size JPEG. See
selfsup/objectives/spark.py for the model's deviations. Variant `smoke` shrinks it to the chosen
variant cut to one block per stage and 8 base channels (no zero-initialised BN), on 64-px images
of the built-in dataset with the ImageNet stem (the mask needs its stride-32 grid: 2 x 2 cells
at 64 px), decoder width 64, a few steps on a CPU.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, variant="50", batch=4096, smoke=False)
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
    # timm's ResNet (the official encoder) zero-initialises each block's last BN.
    c.backbone = dict(name="resnet", variant=arg.variant, zero_init_last_bn=True)
    c.objective = dict(name="spark", mask_ratio=0.6, decoder_width=768, densify_norm="auto")
    peak = 2e-4 * arg.batch / 256
    c.optim = dict(
        name="lamb",
        base_lr=2e-4,
        lr_batch_divisor=256,
        b1=0.9,
        b2=0.95,
        eps=1e-6,
        weight_decay=0.04,
        weight_decay_end=0.2,
        warmup_epochs=40.0,
        schedule="cosine",
        min_lr=0.001 * peak,
        grad_clip_norm=5.0,
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.data = dict(source="builtin", name="shapes", image_size=64)
        c.views = ("rrc(64, scale=(0.67, 1.0), method='bicubic')|flip|normalize('imagenet')",)
        # The ImageNet stem: the sparse mask needs the stride-32 grid (2 x 2 at 64 px).
        # Every residual branch live from step 0 (no zero-initialised BN), so that the first
        # step's gradient reaches every layer (tests/test_objectives_shared.py checks it).
        c.backbone.update(blocks=(1, 1, 1, 1), channels=8, zero_init_last_bn=False)
        c.objective.decoder_width = 64
        c.optim.warmup_epochs = 0.0
        c.optim.warmup_steps = 1
    return c
