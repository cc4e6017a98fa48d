"""Barlow Twins pretraining of ResNet-50 on ImageNet-1k (Zbontar et al. 2021;
facebookresearch/barlowtwins main.py).

    selfsup train --config configs/barlow_twins_resnet_in1k.py --workdir gs://bucket/barlow \
        --config.data.data_dir=/path/to/tensorflow_datasets

Batch 2048, 1000 epochs, LARS (momentum 0.9, eta 0.001; biases and BN parameters without weight
decay or layer adaptation) with lr 0.2 x batch / 256 for weights and 0.0048 x batch / 256 for
biases and BN parameters (`lr_mults` 0.024), 10 warmup epochs then cosine to 0.001 x the peak,
weight decay 1.5e-6 (the paper; main.py defaults to 1e-6), projector 8192-8192-8192, lambda
0.0051, each block's last BN scale zero-initialised (torchvision's zero_init_residual).
Asymmetric views: RandomResizedCrop(224, bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1)
p 0.8, grayscale p 0.2, Gaussian blur p 1.0 / 0.1 (sigma 0.1-2), solarize p 0.0 / 0.2,
ImageNet normalisation. Expected: 73.2% linear-eval top-1 for ResNet-50 (the paper's figure,
not reproduced with selfsup: no run at this scale here). Needs
`imagenet2012` prepared as ArrayRecord in data_dir (see README, "Bring your own data").

The official code blurs with PIL's GaussianBlur(radius=sigma); here a Gaussian kernel of 10% of
the image side (selfsup.augment.color). Variant `smoke` shrinks it to run on a CPU in seconds on
the built-in dataset: the chosen variant cut to one block per stage and 8 base channels (no
zero-initialised BN), with the CIFAR stem (3x3/1, no max-pool), 32-px views, a 32-32-32
projector, batch 16, 3 steps.
"""

import ml_collections as mlc

from selfsup.config import parse_arg

# Per-sample lr for biases and BN parameters relative to weights: 0.0048 / 0.2.
BIAS_LR_MULT = 0.0048 / 0.2


def views(size: int) -> tuple[str, str]:
    """The two asymmetric view specs at `size` px."""
    common = (
        f"rrc({size}, scale=(0.08, 1.0), method='bicubic')|flip"
        "|color_jitter(0.4, 0.4, 0.2, 0.1, p=0.8)|grayscale(0.2)"
    )
    norm = "|normalize('imagenet')"
    return (
        f"{common}|blur(1.0, sigma=(0.1, 2.0)){norm}",
        f"{common}|blur(0.1, sigma=(0.1, 2.0))|solarize(0.2){norm}",
    )


def get_config(arg=None):
    arg = parse_arg(arg, variant="50", batch=2048, epochs=1000.0, smoke=False)
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
    c.objective = dict(name="barlow_twins", projector=(8192, 8192, 8192), lambd=0.0051)
    peak = 0.2 * arg.batch / 256
    c.optim = dict(
        name="lars",
        base_lr=0.2,
        lr_batch_divisor=256,
        lr_mults=((r".*/bias$", BIAS_LR_MULT), (r".*/scale$", BIAS_LR_MULT)),
        momentum=0.9,
        trust_coefficient=1e-3,
        weight_decay=1.5e-6,
        no_decay=(r".*/bias$", r".*/scale$"),
        warmup_epochs=10.0,
        schedule="cosine",
        min_lr=0.001 * peak,
    )
    if arg.smoke:
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        c.views = views(32)
        # Every residual branch live from step 0 (no zero-initialised BN), so that the first
        # step's gradient reaches every layer (tests/test_objectives_shared.py checks it).
        c.backbone.update(cifar_stem=True, blocks=(1, 1, 1, 1), channels=8, zero_init_last_bn=False)
        c.objective.update(projector=(32, 32, 32))
        c.optim.update(warmup_epochs=0.0, min_lr=0.0)
        c.optim.warmup_steps = 1
    return c
