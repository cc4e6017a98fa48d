"""Config files, variants, overrides and their errors; the CLI's one-line errors."""

import subprocess
import sys

import ml_collections as mlc
import pytest
from conftest import REPO

from selfsup import config as config_lib
from selfsup.errors import UserError


def test_parse_arg_types_and_flags():
    arg = config_lib.parse_arg(
        "variant=L/16,smoke,steps=7,lr=0.5", variant="B/16", smoke=False, steps=1, lr=0.1
    )
    assert (arg.variant, arg.smoke, arg.steps, arg.lr) == ("L/16", True, 7, 0.5)
    assert config_lib.parse_arg(None, smoke=False).smoke is False


def test_parse_arg_unknown_names_the_key():
    with pytest.raises(UserError, match="'varaint'"):
        config_lib.parse_arg("varaint=B/16", variant="B/16")


def test_resolve_fills_defaults_and_applies_typed_overrides():
    user = mlc.ConfigDict({"total_steps": 10, "optim": {"base_lr": 1e-3}})
    out = config_lib.resolve(
        user,
        {
            "batch_size": "64",
            "optim.b2": "0.99",
            "views": "('resize(32)',)",
            "objective.mask_ratio": "0.5",
            "data.source": "npz",
            "data.path": "/x/y.npz",
        },
    )
    assert out.batch_size == 64 and isinstance(out.batch_size, int)
    assert out.optim.b2 == 0.99 and out.optim.base_lr == 1e-3
    assert out.optim.weight_decay == config_lib.defaults().optim.weight_decay
    assert out.views == ("resize(32)",)
    assert out.objective.mask_ratio == 0.5
    assert out.data.path == "/x/y.npz"
    assert out.is_locked


@pytest.mark.parametrize(
    "source, kept",
    [("folder", "path"), ("npz", "path"), ("tfds", "data_dir name"), ("builtin", "name")],
)
def test_resolve_drops_the_data_keys_the_source_does_not_read(source, kept):
    # The quickstart sets name="shapes"; a folder run's config.json must not carry it.
    loaded = config_lib.load(str(REPO / "configs" / "quickstart.py"))
    out = config_lib.resolve(loaded, {"data.source": source, "data.path": "/d"})
    assert sorted(out.data.keys()) == sorted(["source", "image_size", *kept.split()])


@pytest.mark.parametrize(
    "user, overrides, match",
    [
        ({"total_steps": 1, "batchsize": 3}, {}, "batchsize"),
        ({"total_steps": 1, "optim": {"lr": 3}}, {}, "config.optim.lr"),
        ({"total_steps": 1}, {"optim.betas": "1"}, "optim.betas"),
        ({"total_steps": 1}, {"nope.x": "1"}, "config.nope"),
        ({"total_steps": 1}, {"batch_size": "abc"}, "batch_size.*abc"),
        ({"total_steps": 1}, {"batch_size": "1.5"}, "batch_size.*int"),
        ({"total_steps": "ten"}, {}, "total_steps"),
        ({}, {}, "total_steps and total_epochs"),
        ({"total_steps": 1, "compute_dtype": "fp8"}, {}, "compute_dtype"),
    ],
)
def test_bad_keys_and_values_name_the_key(user, overrides, match):
    with pytest.raises(UserError, match=match):
        config_lib.resolve(mlc.ConfigDict(user), overrides)


def _selfsup(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "selfsup.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_unknown_override_is_one_line_without_traceback(tmp_path):
    proc = _selfsup(
        "train",
        "--config",
        "configs/quickstart.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.batchsize=4",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batchsize" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = _selfsup("train", "--config", "configs/nope.py", "--workdir", str(tmp_path))
    assert (
        proc.returncode == 2 and "configs/nope.py" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_cli_unknown_config_argument(tmp_path):
    proc = _selfsup("train", "--config", "configs/quickstart.py:smok", "--workdir", str(tmp_path))
    assert proc.returncode == 2 and "'smok'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_dataset_is_a_clear_error(tmp_path):
    proc = _selfsup(
        "train",
        "--config",
        "configs/quickstart.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.data.source=npz",
        f"--config.data.path={tmp_path}/missing.npz",
    )
    assert proc.returncode == 2, proc.stderr
    assert "missing.npz" in proc.stderr and "Traceback" not in proc.stderr
