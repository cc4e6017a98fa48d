"""The one training loop: `train_and_evaluate(config, workdir)`. Every objective plugs into it.

The loop owns the infrastructure (mesh, data, checkpoints, logs, signals); the objective owns the
math. Randomness is a function of (seed, step) and the data position is the step, so a resumed
run reproduces the uninterrupted one exactly.

    python -m selfsup.train --config configs/quickstart.py --workdir /tmp/qs
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from tqdm import tqdm

from selfsup import (
    augment,
    checkpoint,
    data,
    distributed,
    finetune,
    logs,
    objectives,
    optim,
    paths,
    sharding,
)
from selfsup import config as config_lib
from selfsup import state as state_lib
from selfsup import workdir as workdir_lib
from selfsup.errors import UserError
from selfsup.evaluators import periodic
from selfsup.ops import global_norm


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of `step` was saved. Carries the signal number."""

    def __init__(self, signum: int, step: int, workdir: str):
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{workdir}. Run the same command to resume."
        )


class Diverged(UserError):
    """The loss or gradient norm became NaN/Inf."""


def stream_keys(seed: int, step: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    """One key per named stream for this step: fold_in(fold_in(key(seed), step), crc32(name)),
    so a stream's keys depend on its name alone, not on which other streams exist."""
    rng = jax.random.fold_in(jax.random.key(seed), step)
    return {name: jax.random.fold_in(rng, zlib.crc32(name.encode())) for name in names}


def build_model(config: mlc.ConfigDict, num_classes: int | None = None):
    """The objective (with its backbone) in the config's compute dtype; an objective with a
    `num_classes` field left unset gets the dataset's `num_classes`."""
    objective, backbone = dict(config.objective), dict(config.backbone)
    if config.compute_dtype == "bfloat16":
        objective.setdefault("dtype", jnp.bfloat16)
        backbone.setdefault("dtype", jnp.bfloat16)
    return objectives.build(objective, backbone, num_classes=num_classes)


def make_grad_fn(model, views_fn, seed: int):
    """grad_fn(state, batch) -> (loss, metrics, grads, model_updates) for one global batch."""

    declared = objectives.contract(model)

    def grad_fn(state: state_lib.TrainState, batch: dict):
        keys = stream_keys(seed, state.step, ("augment", *declared.rng_streams))
        views = views_fn(batch["image"], keys.pop("augment"))
        labels = {"labels": batch["label"]} if declared.needs_labels else {}
        mutable = declared.mutable

        def loss_fn(params):
            variables = {"params": params, **state.model_state}
            (loss, metrics), updates = model.apply(
                variables, views, train=True, rngs=keys, mutable=mutable, **labels
            )
            return loss, (metrics, updates)

        (loss, (metrics, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, metrics, grads, updates

    return grad_fn


def make_train_step(model, tx, views_fn, seed: int, schedule):
    """train_step(state, batch) -> (state, metrics): augment, forward, backward, update."""
    grad_fn = make_grad_fn(model, views_fn, seed)

    def train_step(state: state_lib.TrainState, batch: dict) -> tuple[state_lib.TrainState, dict]:
        loss, metrics, grads, model_updates = grad_fn(state, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            model_state={**state.model_state, **model_updates},
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": global_norm(grads),
            "lr": schedule(state.step),
        }
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step


def compiler_options(mesh) -> dict:
    """XLA options for the train step. On CPU, copy insertion by region analysis: by default
    XLA:CPU copies every donated parameter before the step reads it (124 copies in the MAE
    ViT-B/16 step), as it cannot prove the last read comes before the update writes in place;
    without them the MAE and SimCLR steps are 2-4% faster (BENCHMARKS.md, *Parameter
    copies*)."""
    if any(device.platform != "cpu" for device in mesh.devices.flat):
        return {}
    return {"xla_cpu_copy_insertion_use_region_analysis": True}


def jit_train_step(model, tx, views_fn, seed: int, schedule, mesh, state_shardings):
    """`make_train_step` under jax.jit as the loop runs it: the state donated, its shardings
    kept, the metrics replicated."""
    return jax.jit(
        make_train_step(model, tx, views_fn, seed, schedule),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=compiler_options(mesh),
    )


@dataclasses.dataclass(frozen=True)
class Program:
    """What the loop runs, built from the config alone: the objective (with its backbone), the
    optimizer and its schedule, the views function, example views [2, ...] for initialisation,
    the state's abstract shapes and shardings, and the jitted, sharded train step."""

    model: Any
    tx: optax.GradientTransformation
    schedule: Any
    views_fn: Any
    example_views: tuple
    abstract_state: Any
    state_shardings: Any
    train_step: Any
    total_steps: int


def build_program(config, mesh, num_classes: int | None, steps_per_epoch: int) -> Program:
    """The `Program` for `config` on `mesh`; nothing is computed on a device."""
    total_steps, warmup_steps = resolve_durations(config, steps_per_epoch)
    optim_config = mlc.ConfigDict(config.optim.to_dict())
    optim_config.warmup_steps = warmup_steps
    tx, schedule = optim.build(optim_config, batch_size=config.batch_size, total_steps=total_steps)
    model = build_model(config, num_classes)
    views_fn = augment.build(config.views)
    size = config.data.image_size
    example_views = jax.eval_shape(
        views_fn, jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8), jax.random.key(0)
    )
    num_views = objectives.contract(model).num_views
    if len(example_views) != num_views:
        raise UserError(
            f"config.views has {len(example_views)} view specs, but objective "
            f"'{config.objective.name}' takes {num_views}"
        )
    example_views = tuple(jnp.zeros(v.shape, v.dtype) for v in example_views)
    abstract_state, shardings = state_lib.abstract(
        model, tx, example_views, config.seed, mesh, config.param_sharding
    )
    step = jit_train_step(model, tx, views_fn, config.seed, schedule, mesh, shardings)
    return Program(
        model, tx, schedule, views_fn, example_views, abstract_state, shardings, step, total_steps
    )


def check_batch_size(config: mlc.ConfigDict, mesh) -> None:
    """UserError unless the global batch splits evenly over the mesh's devices and processes."""
    if config.batch_size % mesh.size or config.batch_size % jax.process_count():
        raise UserError(
            f"config.batch_size={config.batch_size} must be divisible by the {mesh.size} devices"
        )


def resolve_durations(config: mlc.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from steps or epochs."""
    total = config.total_steps or math.ceil(config.total_epochs * steps_per_epoch)
    warmup = config.optim.warmup_steps or round(config.optim.warmup_epochs * steps_per_epoch)
    return total, warmup


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict[str, float]:
    """Train (or resume) the run in `workdir`; returns the last logged metrics and the number
    of times the train step compiled (1 unless something retraced)."""
    config = config if config.is_locked else config_lib.resolve(config)
    is_main = jax.process_index() == 0
    # A run that stops before writing anything (a config or data error) leaves no empty workdir.
    created = not paths.path(workdir).exists()
    try:
        workdir_lib.prepare(workdir)
        workdir_lib.check_shared(workdir)
        return _train(config, workdir, is_main)
    except BaseException:
        if created and is_main:
            paths.remove_if_empty(workdir)
        raise


def _train(config: mlc.ConfigDict, workdir: str, is_main: bool) -> dict[str, float]:
    mesh = sharding.make_mesh(config.mesh)
    check_batch_size(config, mesh)
    evals = periodic.DuringTraining(config, mesh)  # checks its configs before anything compiles

    source = data.build_source(config.data, "train")
    data.check_decodes(source, f"config.data ({config.data.source}) split 'train'")
    loader = data.Loader(
        source,
        config.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    total_steps, _ = resolve_durations(config, loader.steps_per_epoch)
    ckpt = checkpoint.Manager(workdir, keep=config.keep_checkpoints)
    # Known before anything compiles: a finished run says so at once.
    latest = ckpt.latest_step()
    done = latest is not None and latest >= total_steps
    if done and checkpoint.is_intact(workdir, latest):  # a damaged one is set aside below
        ckpt.close()
        if is_main:
            print(
                f"selfsup: the run in {workdir} is finished: its checkpoint is at step {latest} "
                f"of {total_steps}; nothing to train (use a new --workdir to train again)",
                file=sys.stderr,
            )
        return {"finished_step": latest}

    try:
        program = build_program(config, mesh, source.num_classes, loader.steps_per_epoch)
    except BaseException:
        ckpt.close()  # an open manager's pending work prints pages of noise at exit
        raise
    if is_main:  # after every check the config alone allows: an error stays the only line
        print(
            f"selfsup: data: {_data_name(config.data)}: {len(source)} training images, "
            f"{source.num_classes} classes",
            file=sys.stderr,
        )
    model, views_fn = program.model, program.views_fn
    init = state_lib.init_fn(model, program.tx, program.example_views, config.seed)
    state = jax.jit(init, out_shardings=program.state_shardings)()
    # Read from the arrays' shardings: shrinks with the fsdp axis.
    memory_mib = sharding.bytes_per_device((state.params, state.opt_state)) / 2**20
    first_log = {"params_optimizer_mib_per_device": memory_mib}
    if is_main:
        print(f"selfsup: params+optimizer: {memory_mib:.1f} MiB per device", file=sys.stderr)

    images = ReconstructionImages(config, model, views_fn, source, mesh)
    try:
        state = _restore_or_init(ckpt, state, config, is_main)
        start = int(state.step)
        if is_main:
            if latest is not None:
                print(f"selfsup: resuming from step {start} of {total_steps}", file=sys.stderr)
            with _disk_errors(workdir):
                paths.write_text(paths.path(workdir) / "config.json", config_lib.to_json(config))
                # Steps after the checkpoint are about to run again: log each step once.
                logs.drop_records_after(workdir, start)
        writer = logs.Writer(workdir, active=is_main)
    except BaseException:
        ckpt.close()  # an open manager's pending work prints pages of noise at exit
        raise
    if images.skipped:
        first_log["skipped_reconstruction_images"] = images.skipped

    batch_sharding = sharding.batch_sharding(mesh)
    train_step = program.train_step
    meta = {"config": config.to_dict()}
    progress = tqdm(
        total=total_steps, initial=start, disable=not is_main, unit="step", dynamic_ncols=True
    )
    window = MetricWindow(config.batch_size, on_diverged=lambda: _last_good(ckpt, workdir))
    # The parameters' norm, where it matters: before each save (a broken update is never
    # saved) and at each log; per step it would re-read every parameter (MAE ViT-B/16 on CPU:
    # 1-3% of the step; BENCHMARKS.md, *Metric norms*).
    params_norm = jax.jit(global_norm, out_shardings=sharding.replicated(mesh))
    param_norm = math.nan
    stop_vote = distributed.StopVote()
    last: dict[str, float] = {}
    batches = loader.iterate(start_step=start)
    failed = False
    with SignalCatcher() as signals, _disk_errors(workdir):
        try:
            for step in range(start, total_steps):
                batch = {
                    k: jax.make_array_from_process_local_data(batch_sharding, v)
                    for k, v in next(batches).items()
                }
                state, metrics = train_step(state, batch)
                # Fetch the previous step's metrics while this one runs (one step of lag).
                window.push(step, metrics)
                # All processes stop at the same step, even if only some got the signal.
                signum = stop_vote(signals.signum)
                done = step + 1
                at_end = done == total_steps
                save_now = done % config.checkpoint_every_steps == 0 or at_end or signum
                if save_now or done % config.log_every_steps == 0:
                    window.drain()  # every step up to `done` is checked before it is saved
                    param_norm = float(params_norm(state.params))
                    window.check({"param_norm": param_norm}, done)
                if done % config.log_every_steps == 0 or at_end:
                    last = {**window.flush(), "param_norm": param_norm}
                    skipped = distributed.sum_over_processes(loader.skipped)
                    writer.scalars(done, {**last, **first_log, "skipped_images": skipped})
                    first_log = {}
                    progress.set_postfix(
                        loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}"
                    )
                progress.update(1)
                if images.due(done, at_end):
                    images.write(writer, done, state)
                if save_now:
                    ckpt.save(
                        done,
                        state.to_dict(),
                        {**meta, "data_position": done},
                        wait=at_end or bool(signum),
                    )
                if signum:
                    raise Interrupted(signum, done, workdir)
                if evals.due(done, at_end):
                    started = time.perf_counter()
                    results = evals.run(done, state.params, state.model_state, at_end=at_end)
                    writer.scalars(done, results)
                    last = {**last, **results}
                    if is_main:
                        progress.write(periodic.summary(done, results, evals.baseline), sys.stderr)
                    window.started += time.perf_counter() - started  # not in images/s
        except BaseException:
            failed = True
            raise
        finally:
            progress.close()
            batches.close()
            # After a failure (a full disk: the pending save fails again here) the first error
            # is the one to report.
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                ckpt.wait()
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                ckpt.close()
            with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                writer.close()
    # More than one compilation means something retraced the step (a shape or dtype changed).
    return {**last, "train_step_compilations": train_step._cache_size()}


def _data_name(data_config) -> str:
    """The dataset as the user named it, e.g. "folder /data/pets" or "tfds imagenet2012"."""
    kind = data_config.source
    where = data_config.get("path") if kind in ("folder", "npz") else data_config.get("name")
    if kind == "tfds" and data_config.get("data_dir"):
        where = f"{where} in {data_config.data_dir}"
    return f"{kind} {where}"


def _restore_or_init(ckpt, state, config, is_main: bool):
    """The newest intact checkpoint's state (damaged newer ones are set aside, said in one
    line), else the fine-tuning initialisation, else `state` as built."""
    if ckpt.latest_step() is not None:
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.to_dict()
        )
        restored, meta, damaged = ckpt.restore_intact(target)
        if damaged and is_main:
            steps = [int(e.step_dir.name) for e in damaged]
            print(
                f"selfsup: checkpoint step(s) {steps} in {ckpt.directory} are damaged "
                f"({damaged[0].cause}); moved to {ckpt.directory.parent / 'checkpoints_damaged'}, "
                f"resuming from step {meta['step']}",
                file=sys.stderr,
            )
        return state.from_dict(restored)
    if config.init_from:  # a new fine-tuning run; a resumed one restored its own state above
        return finetune.load_backbone(state, config.init_from, config.init_from_step or None)
    return state


@contextlib.contextmanager
def _disk_errors(workdir: str):
    """A full disk (in a checkpoint, log or image write) as one line naming the workdir."""
    try:
        with workdir_lib.QuietDiskErrors():
            yield
    except UserError:
        raise
    except Exception as e:
        cause = workdir_lib.disk_error(e)
        if cause is None:
            raise
        raise UserError(
            f"cannot write to workdir {paths.path(workdir)}: {cause}; free space there, then "
            "run the same command to resume from the last checkpoint"
        ) from None


def _last_good(ckpt, workdir: str) -> str:
    ckpt.wait()
    kept = ckpt.latest_step()
    if kept is None:
        return "No checkpoint was written yet."
    return f"The last good checkpoint (step {kept}) is kept in {workdir}."


class MetricWindow:
    """Per-step metrics fetched from the device with one step of lag, checked for NaN/Inf, and
    averaged over the log window."""

    def __init__(self, batch_size: int, on_diverged):
        self.batch_size = batch_size
        self.on_diverged = on_diverged
        self.pending: tuple[int, dict] | None = None
        self.sums: dict[str, float] = {}
        self.count = 0
        self.started = time.perf_counter()

    def push(self, step: int, metrics: dict) -> None:
        """Queue this step's (device) metrics; fetch and check the previous step's."""
        self.drain()
        self.pending = (step, metrics)

    def drain(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.check(values, step + 1)
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def check(self, values: dict[str, float], step: int) -> None:
        """Raise `Diverged` if the loss or a norm among `values` (after `step` steps) is NaN/Inf."""
        bad = [
            k for k in ("loss", "grad_norm", "param_norm") if not math.isfinite(values.get(k, 0.0))
        ]
        if bad:
            raise Diverged(
                f"{bad[0]} is {values[bad[0]]} at step {step}; stopped. {self.on_diverged()} "
                "Lower optim.base_lr or set optim.grad_clip_norm, then run again."
            )

    def flush(self) -> dict[str, float]:
        """Averages since the last flush, plus images/s over that wall time."""
        now = time.perf_counter()
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out["images_per_s"] = self.count * self.batch_size / max(now - self.started, 1e-9)
        self.sums, self.count, self.started = {}, 0, now
        return out


class ReconstructionImages:
    """original | masked input | reconstruction, for objectives with a `reconstruct` method.

    Uses the first `num_images` training images, the view's size and normalisation, no random
    crop, and a fixed mask, so the images of successive steps are comparable.
    """

    def __init__(self, config, model, views_fn, source, mesh):
        self.enabled = objectives.contract(model).reconstructs and config.num_images > 0
        self.every, self.skipped = config.image_every_steps, 0
        if not self.enabled:
            return
        display_fn, self.mean, self.std = display_view(config.views[0], config.data.image_size)
        # Undecodable images are skipped and counted, as in the training batches.
        host, self.skipped = data.first_decodable(source, config.num_images)
        self.images = jax.device_put(host, sharding.replicated(mesh))
        key = jax.random.key(config.seed)

        def reconstruct(params, model_state, images):
            variables = {"params": params, **model_state}
            return model.apply(
                variables, display_fn(images, key), method="reconstruct", rngs={"mask": key}
            )

        self.fn = jax.jit(reconstruct, out_shardings=sharding.replicated(mesh))

    def due(self, step: int, at_end: bool) -> bool:
        return self.enabled and (at_end or (self.every > 0 and step % self.every == 0))

    def write(self, writer: logs.Writer, step: int, state) -> None:
        out = self.fn(state.params, state.model_state, self.images)
        order = [k for k in ("original", "masked", "reconstruction") if k in out]
        order += sorted(set(out) - set(order))  # jit returns dicts with sorted keys
        columns = {k: np.asarray(out[k]) * self.std + self.mean for k in order}
        writer.image(step, "reconstruction", logs.image_grid(columns))


def display_view(spec: str, image_size: int):
    """(views_fn, mean, std): `spec`'s output size and normalisation without its random ops, and
    the per-channel affine map that undoes the normalisation for display."""
    (shape,) = jax.eval_shape(
        augment.build([spec]),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8),
        jax.random.key(0),
    )
    normalize = [
        f"{name}({', '.join([*map(repr, args), *(f'{k}={v!r}' for k, v in kwargs.items())])})"
        for name, args, kwargs in augment.parse(spec)
        if name == "normalize"
    ]
    views_fn = augment.build(["|".join([f"resize({tuple(shape.shape[1:3])})", *normalize])])
    # The normalisation is affine per channel: read it off from the images 0 and 1.
    probe = views_fn(jnp.stack([jnp.zeros((1, 1, 3)), jnp.ones((1, 1, 3))]), jax.random.key(0))[0]
    zero, one = np.asarray(probe[0, 0, 0]), np.asarray(probe[1, 0, 0])
    std = 1.0 / (one - zero)
    return views_fn, -zero * std, std


class SignalCatcher:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step; a second SIGINT aborts."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    from selfsup import cli

    sys.exit(cli.main(["train", *sys.argv[1:]]))
