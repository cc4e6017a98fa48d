"""SimCLRv2 pretraining of a ResNet on ImageNet-1k (Chen et al. 2020, "Big Self-Supervised Models
are Strong Semi-Supervised Learners"; google-research/simclr tf2 recipe).

    selfsup train --config configs/simclr_resnet_in1k.py:variant=50x2-sk --workdir gs://b/simclr \
        --config.data.data_dir=/path/to/tensorflow_datasets

Batch 4096, 800 epochs, LARS (momentum 0.9, eta 0.001; BN parameters and biases without weight decay
or layer adaptation) at lr 0.075 x sqrt(batch) = 4.8 with 10 warmup epochs then cosine to 0, weight
decay 1e-4, temperature 0.1, 3-layer projection head (hidden = backbone width, out 128), global
BatchNorm (momentum 0.9, eps 1e-5), each block's last BN scale zero-initialised. Views:
RandomResizedCrop(224, 0.08-1, bicubic), flip, colour jitter (strength 1, p 0.8), grayscale p 0.2,
Gaussian blur p 0.5 (sigma 0.1-2), pixels in [0, 1] without mean/std normalisation. Variants:
'<depth>[x<width>][-sk]' with depth 50/101/152, width 1-3. Expected linear-eval top-1 (the official
SimCLRv2 checkpoints, 800 epochs): R50 71.7, R50-SK 74.6, R50x2-SK 77.7, R152x3-SK 79.8 (the paper's
figures, not reproduced with selfsup: no run at this scale here). Needs `imagenet2012` prepared as
ArrayRecord in data_dir (see README, "Bring your own data"). Fine-tuning keeps the head's first
layer (selfsup.objectives.simclr.FINETUNE_LAYER), as the paper.

The learning rate uses square-root batch scaling, computed here from the config argument `batch`
(`:batch=1024`), with lr_batch_divisor=0 (no further scaling): change the batch size with that
argument, not with --config.batch_size, or the lr stays that of the old batch. Deviation: the
weight decay is the SimCLRv2 one (1e-4: the tf2 README's ImageNet command, whose "known issues"
note that v1 and v2 used different decays), not v1's 1e-6 (tf2 run.py's default). Variant
`smoke` shrinks it to run on a CPU in seconds on the built-in dataset: the chosen variant cut to
one block per stage and 8 base channels (no zero-initialised BN), with the CIFAR stem (3x3/1, no
max-pool), on 32-px views without blur (SimCLR's CIFAR setting), batch 16, 3 steps.
"""

import math

import ml_collections as mlc

from selfsup.config import parse_arg

BASE_LR = 0.075  # x sqrt(batch)


def views(size: int, blur: bool = True) -> tuple[str, str]:
    """SimCLR's two (identical) view specs at `size` px, in [0, 1] without normalisation."""
    spec = (
        f"rrc({size}, scale=(0.08, 1.0), method='bicubic')|flip"
        "|color_jitter(strength=1.0, p=0.8)|grayscale(0.2)"
        + ("|blur(0.5, sigma=(0.1, 2.0))" if blur else "")
        + "|normalize('none')"
    )
    return (spec, spec)


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
    c.views = views(224)
    c.backbone = dict(name="resnet", variant=arg.variant, zero_init_last_bn=True, bn_momentum=0.9)
    c.objective = dict(name="simclr", temperature=0.1, proj_layers=3, proj_dim=128, bn_momentum=0.9)
    c.optim = dict(
        name="lars_simclr",
        base_lr=BASE_LR * math.sqrt(arg.batch),
        lr_batch_divisor=0,  # square-root scaling is already in base_lr
        momentum=0.9,
        trust_coefficient=1e-3,
        weight_decay=1e-4,
        no_decay=(r".*/bias$", r".*/scale$"),
        warmup_epochs=10.0,
        schedule="cosine",
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = views(32, blur=False)
        # Every residual branch live from step 0 (no zero-initialised BN), so that the first
        # step's gradient reaches every layer (tests/test_objectives_shared.py checks it).
        c.backbone.update(cifar_stem=True, blocks=(1, 1, 1, 1), channels=8, zero_init_last_bn=False)
        c.objective.update(proj_dim=32)
        c.optim.update(base_lr=BASE_LR * math.sqrt(16), warmup_epochs=0.0)
        c.optim.warmup_steps = 1
    return c
