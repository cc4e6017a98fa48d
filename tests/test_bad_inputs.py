"""The catalogue of bad inputs: every user mistake through the real command, in a subprocess.

Each row runs `selfsup train | eval | export` and asserts exit code 2, exactly one error line on
stderr naming the problem, no traceback, and that every file the user had is still there,
unchanged. The next bad input is one more row in `CASES`. Rows that fail before anything
compiles run in the default tier; rows that need a compiled model are marked slow.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, xla_flags
from PIL import Image

SMOKE = "configs/quickstart.py:smoke"
_NOISE = (  # lines a failing run may print before its error; anything else is reported
    re.compile(r"^selfsup: params\+optimizer: "),
    re.compile(r"^selfsup: data: .* training images, \d+ classes$"),
    re.compile(r"^\s*\d+%\|"),  # tqdm
    re.compile(r"^\s*$"),
)


@dataclass
class Case:
    name: str
    args: list[str]  # after `python -m selfsup.cli`; "{tmp}" is the case's directory
    expect: str  # regex the error line must match
    setup: Callable[[Path], None] = lambda tmp: None
    slow: bool = False
    env: dict[str, str] = field(default_factory=dict)
    prelude: str = ""  # Python run before the CLI in the same process (fault injection)


# --- inputs -----------------------------------------------------------------------------------


def _npz(name: str, images, labels, **extra) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        np.savez(tmp / name, images=images, labels=labels, **extra)

    return setup


_HWC = np.zeros((20, 8, 8, 3), np.uint8)
_NCHW = np.zeros((20, 3, 8, 8), np.uint8)
_U8_LABELS = np.arange(20, dtype=np.uint8) % 10


def _train_npz(name: str, *more: str) -> list[str]:
    return [
        "train", "--config", SMOKE, "--workdir", "{tmp}/w",
        "--config.data.source=npz", f"--config.data.path={{tmp}}/{name}", *more,
    ]  # fmt: skip


def _write(relative: str, text: str) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return setup


def _mae_resnet_config(tmp: Path) -> None:
    (tmp / "mae_resnet.py").write_text(
        textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("qs", {str(REPO / "configs/quickstart.py")!r})
        qs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(qs)

        def get_config(arg=None):
            c = qs.get_config("smoke")
            c.backbone = dict(name="resnet", variant="18")
            return c
        """)
    )


def _truncated_pngs(tmp: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 99, np.uint8)).save(buffer, format="PNG")
    for c in range(2):
        (tmp / "images" / f"c{c}").mkdir(parents=True)
        for i in range(20):
            (tmp / "images" / f"c{c}" / f"{i}.png").write_bytes(buffer.getvalue()[:40])


def _truncated_npz(tmp: Path) -> None:
    np.savez(tmp / "full.npz", images=np.ones((200, 32, 32, 3), np.uint8), labels=np.zeros(200))
    data = (tmp / "full.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp / "full.npz").unlink()


def _truncated_tfds(tmp: Path) -> None:
    import tensorflow_datasets as tfds

    class SelfsupCatalogueRgb(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=2),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(40):
                buffer = io.BytesIO()
                Image.fromarray(np.full((16, 16, 3), i, np.uint8)).save(buffer, format="PNG")
                yield i, {"image": buffer.getvalue(), "label": i % 2}

    builder = SelfsupCatalogueRgb(data_dir=str(tmp / "tfds"), file_format="array_record")
    builder.download_and_prepare()
    (record,) = (tmp / "tfds").rglob("*.array_record-*")
    os.truncate(record, record.stat().st_size // 2)


def _checkpoint(tmp: Path, damage: str | None = None) -> None:
    """A checkpoint (steps 2 and 4) as `selfsup train` writes it, of a tiny stand-in state."""
    code = f"""
import jax.numpy as jnp, numpy as np
from selfsup.io import checkpoint
m = checkpoint.Manager({str(tmp / "run")!r})
for step in (2, 4):
    rng = np.random.default_rng(step)
    params = {{"backbone": {{"w": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}}}}
    m.save(step, {{"step": jnp.asarray(step), "params": params, "model_state": {{}}}},
           {{"config": {{"backbone": {{"name": "vit"}}}}}}, wait=True)
m.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=_env())
    if damage == "flip":
        _flip_array_bytes(tmp / "run" / "checkpoints" / "4")
    elif damage == "truncate":  # the largest file: array values
        step_dir = tmp / "run" / "checkpoints" / "4"
        largest = max(
            (p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
        )
        os.truncate(largest, largest.stat().st_size // 2)


def _flip_array_bytes(step_dir: Path) -> None:
    """Inverts 64 bytes in the middle of the largest file of a checkpoint: raw array values,
    which orbax reads back without complaint."""
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    largest.write_bytes(bytes(data))


def _file(relative: str) -> Callable[[Path], None]:
    return _write(relative, "not a directory\n")


_ENOSPC_AT_STEP_4 = f"""
import errno
from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
_save = handler.JsonCheckpointHandler._save_fn
async def _save_fn(self, x, directory):
    if "/4.orbax-checkpoint-tmp" in str(directory):
        raise OSError({errno.ENOSPC}, "No space left on device", str(directory))
    return await _save(self, x, directory)
handler.JsonCheckpointHandler._save_fn = _save_fn
"""


# --- the catalogue ----------------------------------------------------------------------------

CASES = [
    # Config mistakes.
    Case("unknown_key", ["train", "--config", SMOKE, "--workdir", "{tmp}/w", "--config.nope=1"],
         r"unknown config key 'nope'"),
    Case("wrong_type", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                        "--config.batch_size=abc"], r"batch_size: cannot read 'abc' as int"),
    Case("missing_config_file", ["train", "--config", "{tmp}/none.py", "--workdir", "{tmp}/w"],
         r"config file '.*none\.py' not found"),
    Case("keep_checkpoints_0", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                                "--config.keep_checkpoints=0"], r"keep_checkpoints is 0; .*>= 1"),
    Case("keep_checkpoints_negative", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                                       "--config.keep_checkpoints=-1"], r"keep_checkpoints is -1"),
    Case("checkpoint_every_0", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                                "--config.checkpoint_every_steps=0"],
         r"checkpoint_every_steps is 0; it must be >= 1"),
    Case("log_every_0", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                         "--config.log_every_steps=0"], r"log_every_steps is 0; it must be >= 1"),
    Case("mae_on_resnet", ["train", "--config", "{tmp}/mae_resnet.py", "--workdir", "{tmp}/w"],
         r"resnet", setup=_mae_resnet_config),
    Case("batch_not_divisible", ["train", "--config", SMOKE, "--workdir", "{tmp}/w"],
         r"batch_size=16 must be divisible by the 3 devices",
         env={"XLA_FLAGS": xla_flags(3)}),
    # Data.
    Case("missing_npz", _train_npz("none.npz"), r"npz file .*none\.npz not found"),
    Case("wrong_array_names", _train_npz("p.npz"), r"p\.npz lacks \['images', 'labels'\]",
         setup=lambda tmp: np.savez(tmp / "p.npz", pixels=_HWC)),
    Case("nchw_uint8_labels", _train_npz("u8.npz"), r"channels first \(NCHW\)",
         setup=_npz("u8.npz", _NCHW, _U8_LABELS)),
    Case("nchw_for_mae", _train_npz("nchw.npz"),
         r"images has shape \(20, 3, 8, 8\), channels first",
         setup=_npz("nchw.npz", _NCHW, np.arange(20) % 10, label_names=np.arange(10))),
    Case("float_images_uint8_labels", _train_npz("f.npz"), r"has dtype float32; store uint8",
         setup=_npz("f.npz", _HWC.astype(np.float32), _U8_LABELS)),
    Case("length_mismatch_uint8_labels", _train_npz("n.npz"),
         r"holds 20 images but labels 7 labels", setup=_npz("n.npz", _HWC, _U8_LABELS[:7])),
    Case("labels_n_by_2", _train_npz("l2.npz"), r"labels has dtype int64 and shape \(20, 2\)",
         setup=_npz("l2.npz", _HWC, np.zeros((20, 2), np.int64))),
    Case("truncated_npz", _train_npz("cut.npz"), r"cut\.npz is not an \.npz", setup=_truncated_npz),
    Case("truncated_images", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                              "--config.data.source=folder", "--config.data.path={tmp}/images"],
         r"none of the first 32 images decodes .*truncated or damaged", setup=_truncated_pngs),
    Case("truncated_tfds_file", ["train", "--config", SMOKE, "--workdir", "{tmp}/w",
                                 "--config.data.source=tfds", "--config.data.data_dir={tmp}/tfds",
                                 "--config.data.name=selfsup_catalogue_rgb"],
         r"none of the first 32 images decodes .*truncated or damaged", setup=_truncated_tfds),
    # The workdir.
    Case("workdir_is_a_file", ["train", "--config", SMOKE, "--workdir", "{tmp}/f"],
         r"workdir .*/f is a file, not a directory", setup=_file("f")),
    Case("workdir_under_a_file", ["train", "--config", SMOKE, "--workdir", "{tmp}/f/run"],
         r"workdir .*/f/run lies under .*/f, which is a file", setup=_file("f")),
    Case("read_only_workdir_new_run", ["train", "--config", SMOKE, "--workdir", "{ro}"],
         r"workdir .* is not writable \((Read-only file system|Permission denied)\)"),
    Case("read_only_workdir_resume", ["train", "--config", SMOKE, "--workdir", "{ro}/run"],
         r"workdir .*/run is not writable", setup=_checkpoint),
    Case("read_only_workdir_eval", ["eval", "--config", "configs/eval/knn.py:smoke",
                                    "--workdir", "{ro}/run"], r"workdir .*/run is not writable",
         setup=_checkpoint),
    # Checkpoints.
    Case("eval_no_checkpoint", ["eval", "--config", "configs/eval/knn.py", "--workdir", "{tmp}"],
         r"no checkpoint in"),
    Case("export_missing_step", ["export", "--workdir", "{tmp}/run", "--out", "{tmp}/out",
                                 "--step", "3"], r"no checkpoint for step 3 .*pick one of \[2, 4\]",
         setup=_checkpoint),
    Case("eval_damaged_checkpoint", ["eval", "--config", "configs/eval/knn.py", "--workdir",
                                     "{tmp}/run"],
         r"checkpoint .*/run/checkpoints/4 is damaged .*intact steps: \[2\]",
         setup=lambda tmp: _checkpoint(tmp, "flip")),
    Case("export_damaged_checkpoint", ["export", "--workdir", "{tmp}/run", "--out", "{tmp}/out"],
         r"checkpoint .*/run/checkpoints/4 is damaged .*params/backbone/w does not match its "
         r"checksum.*intact steps: \[2\]", setup=lambda tmp: _checkpoint(tmp, "flip")),
    Case("export_truncated_checkpoint", ["export", "--workdir", "{tmp}/run", "--out",
                                         "{tmp}/out", "--step", "4"],
         r"checkpoint .*/checkpoints/4 is damaged or unreadable \(ValueError: OUT_OF_RANGE: .*"
         r"intact steps: \[2\]", setup=lambda tmp: _checkpoint(tmp, "truncate")),
    # Need a compiled model.
    Case("every_checkpoint_damaged", ["train", "--config", SMOKE, "--workdir", "{tmp}/run"],
         r"every checkpoint in .*/run/checkpoints is damaged", slow=True,
         setup=lambda tmp: _trained(tmp, damage=("2", "4"))),
    Case("disk_full_at_a_checkpoint", ["train", "--config", SMOKE, "--workdir", "{tmp}/run"],
         r"cannot write to workdir .*/run: No space left on device; free space there", slow=True,
         prelude=_ENOSPC_AT_STEP_4),
]  # fmt: skip


def _env(**extra: str) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **extra}


_TRAINED: dict[str, Path] = {}


def _trained(tmp: Path, damage: tuple[str, ...] = ()) -> None:
    """A copy of one smoke run's workdir (trained once per session), some steps damaged."""
    if "smoke" not in _TRAINED:
        source = tmp.parent / "trained-smoke"
        proc = subprocess.run(
            [sys.executable, "-m", "selfsup.cli", "train", "--config", SMOKE,
             "--workdir", str(source)],
            capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        _TRAINED["smoke"] = source
    shutil.copytree(_TRAINED["smoke"], tmp / "run")
    for step in damage:
        _flip_array_bytes(tmp / "run" / "checkpoints" / step)


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _read_only(path: Path):
    """Makes `path` read-only for the command: by permissions, or for root (whom permissions do
    not stop) by a read-only bind mount. Returns the undo function; skips where neither works."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        return lambda: [p.chmod(m) for p, m in modes.items()]
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"cannot make a read-only directory as root here: {bind.stderr!r}")
    ro = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True)
    undo = lambda: subprocess.run(["umount", str(path)], check=True)  # noqa: E731
    if ro.returncode != 0:
        undo()
        pytest.skip(f"cannot remount read-only here: {ro.stderr!r}")
    return undo


def run_cli(args: list[str], *, env: dict | None = None, prelude: str = "", timeout=600):
    code = f"{prelude}\nimport sys\nfrom selfsup.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args] if prelude else
        [sys.executable, "-m", "selfsup.cli", *args],
        capture_output=True, text=True, cwd=REPO, env=_env(**(env or {})), timeout=timeout,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CASES],
)
def test_bad_input(case: Case, tmp_path: Path):
    tmp = tmp_path / "case"
    tmp.mkdir()
    case.setup(tmp)
    undo = _read_only(tmp) if any("{ro}" in a for a in case.args) else None
    try:
        before = _snapshot(tmp)
        args = [a.replace("{tmp}", str(tmp)).replace("{ro}", str(tmp)) for a in case.args]
        proc = run_cli(args, env=case.env, prelude=case.prelude)
        after = _snapshot(tmp)
    finally:
        if undo:
            undo()
    lines = [line for line in proc.stderr.splitlines() if not any(p.match(line) for p in _NOISE)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    for noise in ("Traceback", "Exception ignored", "<bound method"):
        assert noise not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("selfsup: error: "), lines
    assert re.search(case.expect, lines[0]), lines[0]
    # Nothing the user had is lost or changed (new files, e.g. an empty workdir, are allowed).
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, changed


@pytest.mark.slow
def test_disk_full_keeps_the_previous_checkpoint_and_a_rerun_resumes(tmp_path):
    """The save of step 4 fails with ENOSPC (injected: deterministic, no mount needed); step 2
    stays intact, and the same command, with space again, resumes from it and finishes with the
    loss of an uninterrupted run."""
    args = ["train", "--config", SMOKE, "--workdir", str(tmp_path / "run")]
    full = run_cli(args, prelude=_ENOSPC_AT_STEP_4)
    assert full.returncode == 2, full.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints"))[0] == "2"
    assert "4" not in os.listdir(tmp_path / "run" / "checkpoints")
    rerun = run_cli(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2", "4"]
    straight = run_cli(["train", "--config", SMOKE, "--workdir", str(tmp_path / "straight")])
    loss = re.compile(r"done, loss (\S+)\.")
    assert loss.search(rerun.stderr).group(1) == loss.search(straight.stderr).group(1)


def test_processes_that_do_not_share_the_workdir_stop_with_one_line(tmp_path):
    """Two processes of one run (launch/local.py), each given its own workdir: process 0's
    marker is not seen by process 1, so both exit 2 naming the path, before anything trains."""
    command = (
        f"exec {sys.executable} -m selfsup.cli train --config {SMOKE} "
        f"--workdir {tmp_path}/w$SELFSUP_PROCESS_ID"
    )
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "-n", "2", "--grace", "60", "--", "sh", "-c", command],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    for i in range(2):
        # gloo's own connection line (C++) aside
        lines = [
            line
            for line in proc.stdout.splitlines()
            if line.startswith(f"[{i}] ") and "[Gloo]" not in line
        ]
        assert len(lines) == 1, proc.stdout[-3000:]
        assert re.search(
            rf"selfsup: error: workdir {tmp_path}/w{i} is not shared: process\(es\) \[1\] do "
            "not see the file process 0 wrote there",
            lines[0],
        ), lines
    assert "Traceback" not in proc.stdout + proc.stderr
    # Nothing was written: process 0 removed the workdir it created, process 1's stays empty.
    for workdir in (tmp_path / "w0", tmp_path / "w1"):
        assert not workdir.exists() or os.listdir(workdir) == []


@pytest.mark.slow
def test_mae_skips_and_counts_undecodable_images_in_its_reconstruction_batch(tmp_path):
    """Undecodable files among the first 8 (the fixed batch of reconstruction images), one of
    them over PIL's decompression-bomb limit: MAE trains, as SimCLR does, and counts them."""
    for c in range(2):
        (tmp_path / "images" / f"c{c}").mkdir(parents=True)
        for i in range(16):
            image = np.full((16, 16, 3), 8 * i + c, np.uint8)
            Image.fromarray(image).save(tmp_path / "images" / f"c{c}" / f"{i:02d}.png")
    (tmp_path / "images" / "c0" / "01.png").write_bytes(b"not an image")
    (tmp_path / "images" / "c0" / "03.png").unlink()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="JPEG")
    jpeg = bytearray(buffer.getvalue())
    sof = jpeg.index(b"\xff\xc0")  # the header claims 14000 x 14000
    jpeg[sof + 5 : sof + 9] = (14000).to_bytes(2, "big") * 2
    (tmp_path / "images" / "c0" / "03.jpg").write_bytes(bytes(jpeg))
    proc = run_cli([
        "train", "--config", SMOKE, "--workdir", str(tmp_path / "w"),
        "--config.data.source=folder", f"--config.data.path={tmp_path / 'images'}",
        "--config.image_every_steps=2",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    first = json.loads((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["skipped_reconstruction_images"] == 2
    assert sorted(os.listdir(tmp_path / "w" / "images")) == [
        "reconstruction_0000002.png", "reconstruction_0000004.png",
    ]  # fmt: skip
