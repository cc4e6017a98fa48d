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
