"""SimCLRv2's distillation stage on ImageNet-1k (Chen et al. 2020, Sec. 2.3): a ResNet student
learns the soft predictions (temperature 1) of a frozen fine-tuned teacher on unlabelled images.

    selfsup train --config configs/simclr_distill_resnet_in1k.py:teacher=gs://b/finetuned_r152x3 \
        --workdir gs://bucket/distill_r50 --config.data.data_dir=/path/to/tensorflow_datasets

`teacher` is the workdir of a fine-tuning run (objective `supervised` on the SimCLRv2 backbone)
or of an earlier distillation round; its latest checkpoint is read once, frozen, and kept in the
run's checkpoints. The student (`variant`, ResNet-50 by default) starts from scratch; images are
RandomResizedCrop(224) + flip in [0, 1] without normalisation, the input space of a teacher
fine-tuned from `simclr_resnet_in1k.py` (match the teacher's normalisation otherwise). No labels
are read. Optimiser as pretraining: LARS at 0.075 x sqrt(batch) (computed here from `batch`,
lr_batch_divisor=0), 10 warmup epochs, cosine, weight decay 1e-4, batch 4096; 400 epochs.
Expected (paper, teacher R152x3-SK fine-tuned on 1% / 10% of the labels, student R50):
73.9% / 77.5% top-1 (the paper's figures, not reproduced with selfsup: no run at this scale
here).

Variant `smoke` is self-contained: it first trains its teacher, a tiny supervised ResNet
(configs/supervised_resnet_builtin.py:smoke with the student's backbone settings, 2 steps; once
per machine and source tree, cached in the temp directory), then distils it into the chosen
variant cut to one block per stage and 8 base channels (no zero-initialised BN), with the CIFAR
stem (3x3/1, no max-pool), on 32-px views of the built-in dataset, batch 16, 3 steps.
`:smoke,teacher=DIR` uses another.
"""

import hashlib
import math
import os
import pathlib
import shutil
import tempfile

import ml_collections as mlc

from selfsup.config import parse_arg

BASE_LR = 0.075  # x sqrt(batch)
# The smoke variant's student and teacher backbone settings: a tiny ResNet with the CIFAR stem,
# every residual branch live from step 0 (a gradient reaches every layer in the first step).
SMOKE_BACKBONE = dict(cifar_stem=True, blocks=(1, 1, 1, 1), channels=8, zero_init_last_bn=False)
TEACHER_CONFIG = "supervised_resnet_builtin.py"  # the smoke teacher's, beside this file


def get_config(arg=None):
    arg = parse_arg(arg, variant="50", teacher="", batch=4096, epochs=400.0, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = arg.batch
    c.total_epochs = arg.epochs
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    c.compute_dtype = "bfloat16"
    c.data = dict(source="tfds", name="imagenet2012", data_dir="", image_size=256)
    c.views = ("rrc(224, scale=(0.08, 1.0), method='bicubic')|flip|normalize('none')",)
    c.backbone = dict(name="resnet", variant=arg.variant, zero_init_last_bn=True, bn_momentum=0.9)
    c.objective = dict(name="distill", teacher=arg.teacher, temperature=1.0)
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
        c.seed = 1  # the student's init differs from the teacher's (the same network, seed 0)
        c.batch_size = 16
        c.total_epochs = 0.0
        c.total_steps = 3
        c.log_every_steps = 1
        c.compute_dtype = "float32"
        c.data = dict(source="builtin", name="shapes", image_size=32)
        # The smoke teacher's view normalisation.
        c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
        c.backbone.update(SMOKE_BACKBONE)
        c.objective.teacher = arg.teacher or smoke_teacher()
        c.optim.update(base_lr=BASE_LR * math.sqrt(16), warmup_epochs=0.0)
        c.optim.warmup_steps = 1
    return c


def smoke_teacher() -> str:
    """Workdir of the smoke teacher: configs/supervised_resnet_builtin.py:smoke with the smoke
    student's tiny ResNet (`SMOKE_BACKBONE`), trained for 2 steps.

    Trained once per machine into the temp directory, under a name that changes with the
    teacher's config and selfsup's source code; written elsewhere and renamed when complete, so
    a concurrent or interrupted run never leaves a partial teacher under that name.
    """
    import selfsup
    from selfsup import config as config_lib
    from selfsup.train import loop

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), TEACHER_CONFIG)
    overrides = {f"backbone.{k}": repr(v) for k, v in SMOKE_BACKBONE.items()}
    config = config_lib.resolve(config_lib.load(f"{path}:smoke"), {"total_steps": "2", **overrides})
    digest = hashlib.sha256(config_lib.to_json(config).encode())
    for source in sorted(pathlib.Path(selfsup.__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    workdir = os.path.join(
        tempfile.gettempdir(), f"selfsup_smoke_teacher_{digest.hexdigest()[:12]}"
    )
    if not os.path.isdir(workdir):
        scratch = tempfile.mkdtemp(prefix="selfsup_smoke_teacher_tmp_")
        loop.train_and_evaluate(config, scratch)
        try:
            os.rename(scratch, workdir)
        except OSError:  # another process finished first
            shutil.rmtree(scratch, ignore_errors=True)
    return workdir
