#!/usr/bin/env python3
"""Train with selfsup on a Cloud TPU VM slice: create the slice or reuse it, put the code on every
worker, install selfsup there, start the same `selfsup train` on all workers, detached, and
stream worker 0's log here.

    python launch/tpu.py --name mae-pod --zone us-central2-b --accelerator-type v4-32 \\
        --config configs/mae_vit_in1k.py --workdir gs://my-bucket/mae_b16 --dry-run
    python launch/tpu.py --name mae-pod --zone us-central2-b --logs   # stream the log again
    python launch/tpu.py --name mae-pod --zone us-central2-b --stop   # checkpoint and stop

The run does not depend on this terminal: on each worker it runs in its own session (`setsid
nohup`), its output appended to ~/selfsup-logs/<name>.log, so Ctrl-C here or a dropped ssh
connection stops only the streaming. `--logs` streams worker 0's log again (from the start of
the run) until the run ends; `--stop` sends SIGTERM to the run on every worker, which agree on a
step, save a checkpoint and exit (resume with the same launch command).

`--dry-run` prints every command without running any. Settings come from flags or from
`--settings FILE.py`, a Python file whose `get_config()` returns a dict of the same names
(underscored: accelerator_type, ...); flags win. `name`, `zone` and `accelerator_type` are
required (`--logs` and `--stop` need only `name` and `zone`); `runtime_version` defaults by TPU
generation (v4, v5litepod, v5p, v6e). The code is a copy of this checkout (`local_path`) unless
`git_repo` and `git_ref` are set. `setup` lines run on every worker first (e.g. mounting a shared
file system). The workdir must be one place every worker writes: a `gs://` bucket URL (selfsup
is then installed with its `gcs` extra) or a shared mount; all workers write their part of each
checkpoint there. `--config.key=value` arguments go to `selfsup train`. Processes find each
other through the TPU metadata server (selfsup/parallel/distributed.py).
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REQUIRED = ("name", "zone", "accelerator_type")
DEFAULTS = {
    "name": None,
    "zone": None,
    "accelerator_type": None,
    "runtime_version": None,
    "project": None,
    "spot": False,
    "preemptible": False,
    "git_repo": None,
    "git_ref": None,
    "local_path": str(Path(__file__).resolve().parent.parent),
    "setup": (),
    "env": {},
}
# TPU software versions for JAX, by generation (Cloud TPU docs, "TPU software versions").
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "$HOME/selfsup"
LOGS = "$HOME/selfsup-logs"


class SettingsError(Exception):
    """A missing or invalid setting; the message names it and the fix."""


def load_settings(path: str | None, flags: dict, required=REQUIRED) -> dict:
    """DEFAULTS, then the settings file's `get_config()`, then the flags that were given."""
    settings = dict(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise SettingsError(f"settings file {path} not found")
        get_config = runpy.run_path(path).get("get_config")
        if get_config is None:
            raise SettingsError(f"settings file {path} has no get_config() function")
        from_file = dict(get_config())
        unknown = sorted(set(from_file) - set(DEFAULTS))
        if unknown:
            raise SettingsError(
                f"settings file {path}: unknown setting '{unknown[0]}'; known: {sorted(DEFAULTS)}"
            )
        settings.update(from_file)
    settings.update({k: v for k, v in flags.items() if v is not None})
    for key in required:
        if not settings[key]:
            flag = "--" + key.replace("_", "-")
            raise SettingsError(f"setting '{key}' is missing: pass {flag} or set it in --settings")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", settings["name"]):
        raise SettingsError(
            f"name {settings['name']!r}: TPU names are lowercase letters, digits and '-', "
            "starting with a letter"
        )
    accel = settings["accelerator_type"]
    if accel is None and "accelerator_type" not in required:
        return settings
    match = re.fullmatch(r"(v\w+)-(\d+)", accel)
    if not match:
        raise SettingsError(
            f"accelerator type {accel!r} is not like v4-32 or v5litepod-16 (generation-size)"
        )
    if not settings["runtime_version"]:
        if match.group(1) not in RUNTIMES:
            raise SettingsError(
                f"no default runtime version for {accel}: pass --runtime-version (see "
                "`gcloud compute tpus tpu-vm versions list --zone ZONE`)"
            )
        settings["runtime_version"] = RUNTIMES[match.group(1)]
    if settings["spot"] and settings["preemptible"]:
        raise SettingsError("choose one of spot and preemptible")
    if bool(settings["git_repo"]) != bool(settings["git_ref"]):
        raise SettingsError("git_repo and git_ref go together (or neither: copy local_path)")
    return settings


def _gcloud(s: dict, *args: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={s['zone']}"]
    return cmd + ([f"--project={s['project']}"] if s["project"] else [])


def describe_command(s: dict) -> list[str]:
    return _gcloud(s, "describe", s["name"], "--format=value(state,acceleratorType)")


def create_command(s: dict) -> list[str]:
    cmd = _gcloud(
        s,
        "create",
        s["name"],
        f"--accelerator-type={s['accelerator_type']}",
        f"--version={s['runtime_version']}",
    )
    return cmd + ["--spot"] * bool(s["spot"]) + ["--preemptible"] * bool(s["preemptible"])


def ssh_command(s: dict, script: str, worker: str = "all") -> list[str]:
    """`script` run by bash on every worker at once (or on one)."""
    return _gcloud(s, "ssh", s["name"], f"--worker={worker}", f"--command={script}")


def archive_path(s: dict) -> str:
    return os.path.join(tempfile.gettempdir(), f"selfsup-{s['name']}.tar.gz")


def code_commands(s: dict) -> tuple[list[list[str]], str]:
    """(commands run here, shell lines run on each worker) that put the code in REMOTE_DIR."""
    if s["git_repo"]:
        fetch = (
            f'mkdir -p "{REMOTE_DIR}" && cd "{REMOTE_DIR}" && git init -q && '
            f"git fetch -q --depth=1 {shlex.quote(s['git_repo'])} {shlex.quote(s['git_ref'])} && "
            "git checkout -q -f FETCH_HEAD"
        )
        return [], fetch
    archive = archive_path(s)
    local = [
        ["tar", *(f"--exclude={p}" for p in (".git", "__pycache__", "*.egg-info", ".venv"))]
        + ["-czf", archive, "-C", s["local_path"], "."],
        _gcloud(s, "scp", archive, f"{s['name']}:selfsup.tar.gz", "--worker=all"),
    ]
    unpack = (
        f'rm -rf "{REMOTE_DIR}" && mkdir -p "{REMOTE_DIR}" && '
        f'tar -xzf "$HOME/selfsup.tar.gz" -C "{REMOTE_DIR}"'
    )
    return local, unpack


def install_script(s: dict, fetch: str, extras: str = "") -> str:
    pip = "python3 -m pip install -q"
    return "; ".join(
        [
            "set -e",
            *s["setup"],
            fetch,
            f'{pip} -e "{REMOTE_DIR}{extras}"',
            # libtpu for exactly the jax version selfsup pins.
            'jax_version=$(python3 -c "import jax; print(jax.__version__)")',
            f'{pip} "jax[tpu]==$jax_version"',
        ]
    )


def _files(s: dict) -> tuple[str, str, str]:
    """(log, pid, start) files of the run on a worker: its output, its process group, and the
    log's size when it started (where streaming begins)."""
    return tuple(f'"{LOGS}/{s["name"]}.{ext}"' for ext in ("log", "pid", "start"))


def start_script(s: dict, train_args: Sequence[str]) -> str:
    """Starts `selfsup train` detached: its own session (no terminal, so no SIGHUP when ssh
    drops), stdin closed, output appended to the log; refuses if a run is going on already."""
    log, pid, start = _files(s)
    train = shlex.join(["selfsup", "train", *train_args])
    # The wrapper records its pid (= the process group that --stop signals), and waits for
    # selfsup through a SIGTERM (the trap defers it) to log selfsup's exit status.
    wrapper = shlex.quote(
        f'echo $$ > {pid}; trap : TERM; {train}; echo "selfsup: exited with status $?"'
    )
    return "; ".join(
        [
            f'cd "{REMOTE_DIR}"',
            'export PATH="$HOME/.local/bin:$PATH"',
            *(f"export {k}={shlex.quote(str(v))}" for k, v in s["env"].items()),
            f'mkdir -p "{LOGS}"',
            f'if [ -s {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then echo "a run is going on '
            f'{s["name"]} already: stream it with --logs, or stop it with --stop" >&2; exit 1; fi',
            f"rm -f {pid}",
            f"touch {log}",
            f"stat -c %s {log} > {start}",
            # Then wait (up to 10 s) for the pid file, so that a --stop right away finds it.
            f"setsid nohup bash -c {wrapper} >> {log} 2>&1 < /dev/null & "
            f"for _ in $(seq 100); do [ -s {pid} ] && break; sleep 0.1; done",
        ]
    )


def stream_script(s: dict) -> str:
    """Worker 0's log from the start of the run, until the run ends."""
    log, pid, start = _files(s)
    return "; ".join(
        [
            f'if [ ! -s {pid} ]; then echo "no run was started on {s["name"]}" >&2; exit 1; fi',
            f'tail -c +"$(( $(cat {start}) + 1 ))" --pid="$(cat {pid})" -F {log} 2>/dev/null',
        ]
    )


def stop_script(s: dict) -> str:
    """SIGTERM to the run's process group on this worker: selfsup saves, then exits."""
    _, pid, _ = _files(s)
    return (
        f'if [ -s {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        f'kill -TERM -- "-$(cat {pid})"; else echo "no run is going on $(hostname)" >&2; fi'
    )


def plan(s: dict, train_args: Sequence[str], workdir: str) -> list[tuple[str, list[str]]]:
    """The commands after the describe/create step, each with a comment."""
    local, fetch = code_commands(s)
    extras = "[gcs]" if workdir.startswith("gs://") else ""  # gcsfs for gs:// workdirs
    steps = [("copy this checkout to every worker", cmd) for cmd in local]
    steps.append(
        ("install selfsup on every worker", ssh_command(s, install_script(s, fetch, extras)))
    )
    steps.append(
        ("start training on every worker, detached", ssh_command(s, start_script(s, train_args)))
    )
    steps.append(stream_step(s))
    return steps


def stream_step(s: dict) -> tuple[str, list[str]]:
    return (
        "stream worker 0's log (Ctrl-C stops only the streaming)",
        ssh_command(s, stream_script(s), worker="0"),
    )


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd, **kwargs)


def ensure_tpu(s: dict) -> None:
    """Reuse the slice if it exists with the same accelerator type and is READY; else create it."""
    found = _run(describe_command(s), capture_output=True, text=True)
    if found.returncode == 0:
        state, _, accel = found.stdout.strip().partition("\t")
        if accel and accel != s["accelerator_type"]:
            raise SettingsError(
                f"TPU {s['name']} exists as {accel}, not {s['accelerator_type']}: choose another "
                "name or delete it"
            )
        if state != "READY":
            raise SettingsError(
                f"TPU {s['name']} is {state or 'not ready'}: delete it (gcloud compute tpus "
                f"tpu-vm delete {s['name']} --zone={s['zone']}) and run again to recreate it"
            )
        print(f"reusing TPU {s['name']} ({accel or s['accelerator_type']})", file=sys.stderr)
        return
    if _run(create_command(s)).returncode != 0:
        raise SettingsError(f"could not create TPU {s['name']} (gcloud's message is above)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run `selfsup train` on every worker of a Cloud TPU VM slice.",
        epilog="Other arguments of the form --config.key=value are passed to `selfsup train`.",
    )
    p.add_argument("--config", help="selfsup config, path.py[:arg]")
    p.add_argument("--workdir", help="gs://bucket/run, or a directory every worker sees")
    p.add_argument("--settings", help="Python file with get_config() -> dict of settings")
    p.add_argument("--name", help="the TPU VM's name")
    p.add_argument("--zone", help="e.g. us-central2-b")
    p.add_argument("--accelerator-type", help="e.g. v4-32, v5litepod-16")
    p.add_argument("--runtime-version", help="default: by TPU generation")
    p.add_argument("--project", help="default: gcloud's configured project")
    p.add_argument("--spot", action="store_true", default=None)
    p.add_argument("--preemptible", action="store_true", default=None)
    p.add_argument("--git-repo", help="clone this repository on the workers ...")
    p.add_argument("--git-ref", help="... at this branch, tag or commit")
    p.add_argument("--local-path", help="the checkout to copy (default: this one)")
    p.add_argument("--setup", action="append", help="shell line run on every worker first")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--logs", action="store_true", help="stream worker 0's log of the run")
    mode.add_argument(
        "--stop", action="store_true", help="SIGTERM the run: it saves a checkpoint and exits"
    )
    return p


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):
                i += 1
                arg = f"{arg}={argv[i]}"
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _steps(args, overrides: list[str], s: dict) -> list[tuple[str, list[str]]]:
    if args.logs:
        return [stream_step(s)]
    if args.stop:
        stop = ("SIGTERM to the run on every worker", ssh_command(s, stop_script(s)))
        return [stop, stream_step(s)]
    missing = [f"--{k}" for k in ("config", "workdir") if not getattr(args, k)]
    if missing:
        raise SettingsError(f"{missing[0]} is required to start a run (or pass --logs / --stop)")
    train_args = ["--config", args.config, "--workdir", args.workdir, *overrides]
    return plan(s, train_args, args.workdir)


def main(argv: Sequence[str] | None = None) -> int:
    rest, overrides = _split_overrides(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(rest)
    flags = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    starting = not (args.logs or args.stop)
    try:
        s = load_settings(args.settings, flags, REQUIRED if starting else ("name", "zone"))
        steps = _steps(args, overrides, s)
        if args.dry_run:
            if starting:
                print(f"# reuse TPU VM {s['name']} if it exists (READY, {s['accelerator_type']}):")
                print(shlex.join(describe_command(s)))
                print("# otherwise create it:")
                print(shlex.join(create_command(s)))
            said = None
            for comment, cmd in steps:
                if comment != said:
                    print(f"# {comment}:")
                    said = comment
                print(shlex.join(cmd))
            return 0
        if starting:
            ensure_tpu(s)
        for _, cmd in steps:
            try:
                code = _run(cmd).returncode
            except KeyboardInterrupt:  # only while streaming can this take long
                print(
                    f"\ntpu.py: stopped streaming; the run goes on. Stream it again with --logs, "
                    f"stop it with --stop (--name {s['name']} --zone {s['zone']})",
                    file=sys.stderr,
                )
                return 130
            if code != 0:
                return code
        return 0
    except SettingsError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
