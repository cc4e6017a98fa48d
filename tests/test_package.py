"""The distribution installs only `selfsup*`, and does not shadow the standard library."""

import ssl
import sysconfig
from pathlib import Path


def test_ssl_is_the_standard_library():
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(ssl.__file__).resolve().parent == stdlib
    assert hasattr(ssl, "create_default_context")


def test_generic_folders_are_not_installed_as_packages(tmp_path):
    import subprocess
    import sys

    code = (
        "import importlib.util as u, selfsup; "
        "names = ('configs', 'tests', 'objectives', 'backbones', 'launch'); "
        "print([n for n in names if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]"


def test_importing_selfsup_is_light():
    import subprocess
    import sys

    code = (
        "import sys, selfsup; "
        "print(sorted(m for m in ('jax', 'flax', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _readme_layout() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]


def test_readme_layout_and_the_package_tell_the_same_story():
    """Every sub-package of selfsup/ is in the README's layout, every module of the sub-packages
    whose modules the layout lists file by file too, and every file the layout names exists."""
    import re

    package = Path(__file__).resolve().parents[1] / "selfsup"
    layout = _readme_layout()
    subpackages = sorted(p.name for p in package.iterdir() if (p / "__init__.py").exists())
    missing = [
        f"{name}/" for name in subpackages if not re.search(rf"^  (?:\S+, )*{name}/", layout, re.M)
    ]
    assert not missing, f"sub-packages missing from the README's layout: {missing}"
    listed_by_file = ("train", "parallel", "io", "data", "augment", "optim")
    modules = [
        f"{p.parent.name}/{p.name}"
        for name in listed_by_file
        for p in sorted((package / name).glob("*.py"))
        if not p.name.startswith("__")
    ]
    unlisted = [m for m in modules if m.split("/")[1] not in layout]
    assert not unlisted, f"modules missing from the README's layout: {unlisted}"
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    existing = {p.name for p in package.rglob("*.py")}
    assert named <= existing, f"the layout names files that do not exist: {named - existing}"


_SNAPSHOT = """
import logging, os, signal, sys, warnings
import jax, numpy as np, optax, orbax.checkpoint, flax  # their own set-up is not ours
try:
    import torch  # export/resnet_torch.py needs it
except ImportError:
    pass

def snapshot():
    loggers = [logging.getLogger()] + [
        v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)
    ]
    return {
        "hooks": (sys.unraisablehook, sys.excepthook, sys.displayhook),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
        "loggers": {  # a module's new logger of its own is not a change
            l.name: (l.level, list(l.filters), list(l.handlers), l.propagate, l.disabled)
            for l in loggers
            if not l.name.startswith("selfsup")
        },
        "warnings": list(warnings.filters),
        "environ": dict(os.environ),
        "numpy": np.geterr(),
        "jax": {k: str(v) for k, v in jax.config.values.items()},
    }

before = snapshot()
import pkgutil, importlib, selfsup
for m in pkgutil.walk_packages(selfsup.__path__, "selfsup."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
after = snapshot()
print(sorted(k for k in before if before[k] != after[k]))
"""


def test_importing_every_module_changes_nothing_global():
    """Hooks, signal handlers, other packages' loggers, warning filters, the environment,
    NumPy's and JAX's settings: as they were before every `selfsup.*` module was imported (jax,
    torch and friends imported first: their own set-up is not ours)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _SNAPSHOT], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
