"""SimCLRv2's third stage (Chen et al. 2020, "Big Self-Supervised Models are Strong
Semi-Supervised Learners", Sec. 2.3, Eq. 2): distillation with unlabelled examples.

A frozen teacher (a fine-tuned classifier) imputes soft labels; the student (backbone + linear
`head`) minimises the cross-entropy to them at temperature tau (1 in the paper), scaled by tau^2
as the official `add_kd_loss` does (google-research/simclr, `colabs/distillation_self_training.
ipynb`: `tf.losses.softmax_cross_entropy(teacher_probs, student_logits / T, weights=T**2)`,
which averages over the batch):
L = -tau^2 mean_x sum_y P_T(y | x; tau) log P_S(y | x; tau), P(y | x; tau) = softmax(logits / tau).
The tau^2 keeps the gradients' scale independent of tau (Hinton et al. 2015); at tau = 1 it is the
paper's Eq. 2.
No labels are read, so any image source works as the unlabelled set.

The teacher is the `backbone` + `head` (Dense) of a run's checkpoint (`config.objective.teacher`,
a workdir: a `supervised` fine-tuning run, or a `distill` run for another round). The objective
declares `needs_teacher`; the training side reads the checkpoint (`selfsup.train.teacher`: its
parameters and BatchNorm statistics as host arrays, its architecture from the checkpoint's
config) and hands the `objectives.Teacher` to the `teacher` field. Its variables live in the
objective's "teacher" collection, outside "params": the optimiser never sees them (no gradient,
update, weight decay or optimiser state), the teacher runs in inference mode (running BN
statistics, no dropout) on the student's view, and the collection is checkpointed with the run,
so a resumed run does not depend on the teacher's workdir staying the same. The teacher's view
normalisation must match the student's.

Deviations from the official code: none in the loss. The optional weighted combination with a
labelled cross-entropy (the paper's alternative to Eq. 2 when many labels exist) is not
implemented.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfsup.errors import UserError
from selfsup.objectives import TEACHER_COLLECTION, Teacher


def distill_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """SimCLRv2's distillation loss: [B, C] x 2 -> scalar.

    -T^2 mean_b sum_y softmax(teacher / T)_y * log softmax(student / T)_y, as the official
    `add_kd_loss`. No gradient flows into `teacher_logits`.
    """
    target = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
    student = student_logits.astype(jnp.float32) / temperature
    cross_entropy = optax.softmax_cross_entropy(student, target)
    return temperature**2 * cross_entropy.mean()


def teacher_logits(teacher: Teacher, variables: dict, images: jax.Array) -> jax.Array:
    """The teacher's class logits for images [B, H, W, 3] -> float32 [B, C], inference mode."""
    params = variables["params"]
    backbone_vars = {"params": params["backbone"]}
    backbone_vars.update({c: v["backbone"] for c, v in variables.items() if c != "params"})
    pooled = teacher.backbone.apply(backbone_vars, images, train=False).pooled
    head = params["head"]
    return pooled.astype(jnp.float32) @ head["kernel"] + head["bias"]


class Objective(nn.Module):
    """A student classifier (`backbone` + linear `head`) distilled from the classifier in the
    `teacher` (loaded by the training side from config.objective.teacher); one view
    [B, H, W, 3]."""

    backbone: nn.Module
    teacher: Teacher | None = None
    temperature: float = 1.0
    dtype: Any = jnp.float32

    num_views = 1
    needs_teacher = True
    mutable = ("batch_stats",)  # the student's; the teacher collection is never written
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        if not isinstance(self.teacher, Teacher):
            raise UserError(
                "distill: the teacher must be a loaded classifier (objectives.Teacher, from "
                f"selfsup.train.teacher.with_teacher), got {self.teacher!r}"
            )
        if self.temperature <= 0:
            raise UserError(f"distill: temperature must be > 0, got {self.temperature}")
        super().__post_init__()

    @nn.compact
    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views[0] [B, H, W, 3] -> (loss, {"loss", "teacher_agreement"})."""
        teacher = self.teacher
        stored = {
            key: self.variable(TEACHER_COLLECTION, key, lambda v=value: v).value
            for key, value in teacher.variables.items()
        }
        images = views[0]
        target = jax.lax.stop_gradient(teacher_logits(teacher, stored, images))
        pooled = self.backbone(images, train=train).pooled
        logits = nn.Dense(teacher.num_classes, dtype=self.dtype, name="head")(pooled)
        loss = distill_loss(logits, target, self.temperature)
        agreement = (logits.argmax(-1) == target.argmax(-1)).mean()
        return loss, {"loss": loss, "teacher_agreement": agreement}
