"""`selfsup configs`: every config file with its summary and its arguments, read without running."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from conftest import REPO

from selfsup import cli


def test_lists_every_config_with_its_summary_and_arguments(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    files = sorted(REPO.glob("configs/**/*.py"))
    assert files
    for file in files:
        name = file.relative_to(REPO).as_posix()
        (entry,) = [i for i, line in enumerate(lines) if line.startswith(f"  {name}  [")]
        doc = ast.get_docstring(ast.parse(file.read_text()))
        first_words = " ".join(doc.split()[:6])
        assert " ".join(lines[entry + 1].split()).startswith(first_words), name
    assert "  configs/mae_vit_in1k.py  [variant=B/16, smoke]" in lines
    assert "  configs/eval/knn.py  [smoke, k=20]" in lines
    assert lines.index("eval configs (selfsup eval --config FILE[:ARG]):") > lines.index(
        "training configs (selfsup train --config FILE[:ARG,...]):"
    )


def test_a_folder_of_my_own_configs(tmp_path, capsys):
    (tmp_path / "mine.py").write_text(
        '"""My MAE run on pets.\n\nLonger text.\n"""\n'
        "from selfsup.config import parse_arg\n\n"
        "def get_config(arg=None):\n"
        "    arg = parse_arg(arg, size='B/16', epochs=100.0, teacher='', smoke=False)\n"
        "    return {}\n"
    )
    (tmp_path / "helpers.py").write_text("X = 1\n")  # not a config: no get_config
    (tmp_path / "plain.py").write_text("def get_config(arg=None):\n    return {}\n")
    assert cli.main(["configs", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "training configs (selfsup train --config FILE[:ARG,...]):",
        f"  {tmp_path / 'mine.py'}  [size=B/16, epochs=100.0, teacher='', smoke]",
        "      My MAE run on pets.",
        f"  {tmp_path / 'plain.py'}  [no arguments]",
        "      (no docstring)",
    ]


def test_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["configs", "--dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    expected = f"--dir {tmp_path / 'nope'}: no such folder; pass the configs folder"
    assert err == f"selfsup: error: {expected}"


def test_listing_configs_needs_no_jax():
    # On a pod host, `selfsup configs` must not try to join the pod's multi-process run.
    code = "import sys; from selfsup import cli; cli.main(['configs']); print('jax' in sys.modules)"
    env = {**os.environ, "SLURM_NTASKS": "4", "SLURM_PROCID": "1"}
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "False"
