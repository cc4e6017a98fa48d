"""The one training loop: `train_and_evaluate(config, workdir)`. Every objective plugs into it.

The loop owns the infrastructure (mesh, data, checkpoints, logs, signals); the objective owns the
math. Randomness is a function of (seed, step) and the data position is the step, so a resumed
run reproduces the uninterrupted one exactly.

    python -m selfsup.train --config configs/quickstart.py --workdir /tmp/qs
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time

import jax
import ml_collections as mlc
from tqdm import tqdm

from selfsup import config as config_lib
from selfsup import data
from selfsup.errors import UserError
from selfsup.evaluators import periodic
from selfsup.io import checkpoint, logs, paths
from selfsup.io import workdir as workdir_lib
from selfsup.ops import global_norm
from selfsup.parallel import distributed, sharding
from selfsup.train import finetune
from selfsup.train import state as state_lib
from selfsup.train.monitors import MetricWindow, ReconstructionImages, SignalCatcher
from selfsup.train.step import build_program, check_batch_size, resolve_durations


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint of `step` was saved. Carries the signal number."""

    def __init__(self, signum: int, step: int, workdir: str):
        self.signum = signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
            f"{workdir}. Run the same command to resume."
        )


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
