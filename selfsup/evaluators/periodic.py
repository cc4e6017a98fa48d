"""Evaluators inside the training loop: `config.evaluators` run on the live backbone.

    c.evaluators = dict(every_steps=1000, at_end=True, random_init=True,
                        run=(dict(name="knn", train_limit=5000), dict(name="linear_probe")))

Each entry of `run` is an evaluator config (see `selfsup.evaluators`); its unset data keys and
view come from the training config. They run every `every_steps` steps (0: not during training)
and at the last step if `at_end`, on the current parameters (and BatchNorm statistics) of the
state's `backbone`, on the training mesh, with no checkpoint round trip. An evaluator's own
`every_steps` thins it further during training; at the end every evaluator runs. Every process
of a multi-process run takes part (feature extraction is sharded like training); the loop's
writer logs the results as `eval/<label>/<metric>` (metrics.jsonl and TensorBoard). With
`random_init`, the same evaluators also run once on the backbone at random initialisation (the
baseline pretraining must beat), logged beside them as `random_init/<label>/<metric>`. The
`classifier` evaluator reads the run's own head (`params["head"]`, fine-tuning's) as well.
"""

from __future__ import annotations

from typing import Any

import jax

from selfsup import evaluators


class DuringTraining:
    """The evaluators of a resolved training config; `due(step, at_end)`, then `run(...)`."""

    def __init__(self, config: Any, mesh: jax.sharding.Mesh):
        settings = config.evaluators
        self.train_config, self.mesh = config, mesh
        # Resolve now: a typo in an evaluator config fails before training, not after it.
        self.configs = tuple(evaluators.resolve(c) for c in settings.run)
        self.every, self.at_end = settings.every_steps, settings.at_end
        self.random_init = settings.random_init
        self.baseline: dict[str, float] | None = None
        if self.configs:
            # The float32 backbone of the config; the same object every time, so one compile.
            _, self.encode_fn, _ = evaluators.build_backbone(
                config.backbone, evaluators.default_view(config), config.data.image_size
            )
            for c in self.configs:  # the evaluators check their settings when built
                evaluators.build(evaluators.inherit(c, config), self.encode_fn, mesh=mesh)

    def due(self, step: int, at_end: bool) -> bool:
        if not self.configs:
            return False
        return (at_end and self.at_end) or (self.every > 0 and step % self.every == 0)

    def run(self, step: int, params: Any, model_state: Any, *, at_end: bool) -> dict[str, float]:
        """{"eval/<label>/<metric>": value, ...} (plus "random_init/..." the first time, with
        `random_init`) for the backbone in `params` / `model_state` (the objective's)."""
        variables = evaluators.with_head(evaluators.backbone_variables(params, model_state), params)
        results = evaluators.run_all(
            self.configs,
            self.encode_fn,
            variables,
            mesh=self.mesh,
            # At the end every evaluator runs, whatever its own every_steps (0 divides all).
            step=0 if at_end else step,
            train_config=self.train_config,
        )
        out = {f"eval/{k}": v for k, v in results.items()}
        if self.random_init and self.baseline is None:
            # A random head says nothing: the classifier evaluator has no baseline.
            probes = [c for c in self.configs if c.name != "classifier"]
            self.baseline = evaluators.at_random_init(probes, self.train_config, mesh=self.mesh)
            out.update({f"random_init/{k}": v for k, v in self.baseline.items()})
        return out


def summary(step: int, results: dict[str, float], baseline: dict[str, float] | None) -> str:
    """One line: each evaluator's top-1 (test split), with the random-init baseline if any."""
    base = {f"random_init/{k}": v for k, v in (baseline or {}).items()}
    return f"selfsup: step {step} evaluation: {top1_text({**results, **base})}"


def top1_text(results: dict[str, float]) -> str:
    """ "<label> top-1 X% (random init Y%), ..." from "eval/<label>/top1" and
    "random_init/<label>/top1" entries; "" when there are none."""
    parts = []
    for key, value in results.items():
        if not (key.startswith("eval/") and key.endswith("/top1")):
            continue
        label = key[len("eval/") : -len("/top1")]
        text = f"{label} top-1 {100 * value:.1f}%"
        base = results.get(f"random_init/{label}/top1")
        if base is not None:
            text += f" (random init {100 * base:.1f}%)"
        parts.append(text)
    return ", ".join(parts)
