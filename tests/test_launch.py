"""The launchers: local processes (prefixes, environment, failure, signals), the SLURM script
(text, and its requeue logic run by bash against stand-in srun/scancel/scontrol), and the TPU
launcher (dry-run text, settings errors, and the commands it runs against a stand-in gcloud).
No JAX here: every test runs in about a second.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST_COMPILE, REPO

LAUNCH = REPO / "launch"


def _launch(script: str, *args: str, env: dict | None = None, timeout: float = 60, **kw):
    return subprocess.run(
        [sys.executable, str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        **kw,
    )


def _stand_in(directory: Path, name: str, body: str) -> None:
    """An executable `name` in `directory` (put first on PATH) that runs the bash `body`."""
    path = directory / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _wait_for(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- launch/local.py ------------------------------------------------------------------------------


def test_local_gives_each_process_its_id_and_prefixes_its_output():
    show = "import os; e = os.environ; print(e['SELFSUP_PROCESS_ID'], e['SELFSUP_NUM_PROCESSES'], "
    show += "e['SELFSUP_COORDINATOR'], e['JAX_PLATFORMS'], e['XLA_FLAGS'])"
    proc = _launch("local.py", "-n", "3", "-d", "2", "--", sys.executable, "-c", show)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert len(lines) == 3
    coordinators = set()
    for i, line in enumerate(lines):
        prefix, pid, count, coordinator, platforms, *flags = line.split()
        assert (prefix, pid, count, platforms) == (f"[{i}]", str(i), "3", "cpu")
        # The device count set once; the caller's other XLA flags (the suite's) kept.
        count_flags = [f for f in flags if f.startswith("--xla_force_host_platform_device_count")]
        assert count_flags == ["--xla_force_host_platform_device_count=2"]
        assert set(FAST_COMPILE.split()) <= set(flags)
        coordinators.add(coordinator)
    (coordinator,) = coordinators  # one coordinator for all
    assert coordinator.startswith("127.0.0.1:") and int(coordinator.split(":")[1]) > 0


def test_local_stops_the_others_when_one_fails():
    code = "import os, sys, time\nif os.environ['SELFSUP_PROCESS_ID'] == '1': sys.exit(3)\n"
    code += "time.sleep(600)"
    start = time.monotonic()
    proc = _launch("local.py", "-n", "2", "--grace", "0.5", "--", sys.executable, "-c", code)
    assert proc.returncode == 3
    assert time.monotonic() - start < 30  # the sleeping process was stopped, not waited for


def test_local_passes_on_a_killed_workers_code_and_names_it():
    # Process 1 is SIGKILLed (as the kernel's OOM killer does); process 0 would go on waiting.
    code = "import os, signal, time\nif os.environ['SELFSUP_PROCESS_ID'] == '1':\n"
    code += "    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(600)"
    proc = _launch("local.py", "-n", "2", "--grace", "0.5", "--", sys.executable, "-c", code)
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr  # 137, as a shell says it
    assert proc.stderr.splitlines()[-1] == "local.py: process 1 was killed by SIGKILL"
    code = "import os, sys\nsys.exit(5 if os.environ['SELFSUP_PROCESS_ID'] == '0' else 0)"
    proc = _launch("local.py", "-n", "2", "--", sys.executable, "-c", code)
    assert proc.returncode == 5
    assert proc.stderr.splitlines()[-1] == "local.py: process 0 exited with code 5"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_local_passes_a_signal_on_once_to_every_process(tmp_path, sig):
    # Each process counts the signals it receives, then exits like selfsup does (128 + signum).
    code = f"""
import os, signal, sys, time
got = []
signal.signal({int(sig)}, lambda s, f: got.append(s))
open(os.path.join({str(tmp_path)!r}, os.environ["SELFSUP_PROCESS_ID"]), "w").close()
while not got:
    time.sleep(0.01)
time.sleep(0.5)  # a second signal would arrive by now
print("signals", len(got), flush=True)
sys.exit(128 + got[0])
"""
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCH / "local.py"), "-n", "2", "--", sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    for i in ("0", "1"):
        _wait_for(tmp_path / i)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert sorted(out.splitlines()) == ["[0] signals 1", "[1] signals 1"]


# --- launch/slurm.py ------------------------------------------------------------------------------

SLURM_ARGS = [
    "--nodes=2",
    "--gpus-per-node=8",
    "--partition=gpu",
    "--time=04:00:00",
    "--setup=source ~/venv/bin/activate",
    "--chdir=/home/me/selfsup",
    "--config=configs/mae_vit_in1k.py:variant=B/16",
    "--workdir=/shared/runs/b16",
    "--config.batch_size=4096",
]


def _sbatch_lines(text: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SB")]


def test_slurm_script_one_process_per_gpu():
    proc = _launch("slurm.py", *SLURM_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert _sbatch_lines(proc.stdout) == [
        "--job-name=selfsup",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=04:00:00",
        "--cpus-per-task=8",  # the decode threads need cores
        "--mem=0",  # all of each node's memory
        "--chdir=/home/me/selfsup",
        "--output=%x-%j.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@120",
    ]
    lines = proc.stdout.splitlines()
    assert "source ~/venv/bin/activate" in lines
    assert "JAX_LOCAL_DEVICE_IDS" not in proc.stdout  # JAX gives task i GPU i by itself
    (srun,) = [line for line in lines if line.startswith("srun ")]
    words = shlex.split(srun)
    assert words[:4] == ["srun", "--label", "--kill-on-bad-exit=1", "--cpus-per-task=8"]
    assert words[words.index("selfsup") :] == [
        "selfsup",
        "train",
        "--config",
        "configs/mae_vit_in1k.py:variant=B/16",
        "--workdir",
        "/shared/runs/b16",
        "--config.batch_size=4096",
        "&",
    ]
    assert "trap requeue USR1" in lines


def test_slurm_script_one_process_per_node_sees_all_gpus():
    proc = _launch("slurm.py", *SLURM_ARGS, "--per=node", "--gpus-per-node=4")
    assert proc.returncode == 0, proc.stderr
    assert "--ntasks-per-node=1" in _sbatch_lines(proc.stdout)
    assert "--cpus-per-task=32" in _sbatch_lines(proc.stdout)  # 8 per GPU of the one task
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in proc.stdout.splitlines()
    proc = _launch("slurm.py", *SLURM_ARGS, "--cpus-per-task=12", "--mem=200G")
    assert {"--cpus-per-task=12", "--mem=200G"} <= set(_sbatch_lines(proc.stdout))
    assert "srun --label --kill-on-bad-exit=1 --cpus-per-task=12 " in proc.stdout


def test_slurm_missing_setting_is_an_error():
    args = [a for a in SLURM_ARGS if not a.startswith("--nodes")]
    proc = _launch("slurm.py", *args)
    assert proc.returncode == 2 and "--nodes" in proc.stderr


def _run_sbatch_script(tmp_path: Path, training: str, send_usr1: bool):
    """Runs the generated script with bash: a stand-in srun runs the task command it is given
    (the wrapper around `selfsup train`) with a stand-in `selfsup` whose body is `training`;
    scancel signals both processes, as SLURM signals every process of the step."""
    script = tmp_path / "job.sbatch"
    proc = _launch("slurm.py", *SLURM_ARGS, "--setup=true", "-o", str(script))
    assert proc.returncode == 0, proc.stderr
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    srun = f'echo "srun $*" >> {log}\nwhile [[ "$1" == --* ]]; do shift; done\n'
    srun += f'"$@" &\necho $! > {tmp_path}/task.pid\nwait $!\n'
    _stand_in(bin_dir, "srun", srun)
    _stand_in(bin_dir, "selfsup", f"echo $$ > {tmp_path}/selfsup.pid\n" + training)
    kill = f"kill -TERM $(cat {tmp_path}/task.pid) $(cat {tmp_path}/selfsup.pid)"
    _stand_in(bin_dir, "scancel", f'echo "scancel $*" >> {log}\n{kill}')
    _stand_in(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    shell = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path)
    _wait_for(tmp_path / "selfsup.pid")
    if send_usr1:
        time.sleep(0.2)  # let the shell reach `wait`
        shell.send_signal(signal.SIGUSR1)
    shell.communicate(timeout=60)
    return shell.returncode, log.read_text().splitlines()


# The stand-in "training": runs until SIGTERM, then takes a moment to save and exits 143, as
# selfsup does. The task's wrapper must wait for it (not die of the same SIGTERM, which with
# --kill-on-bad-exit=1 would kill the others mid-save) and report the saved stop as success.
TRAINING = (
    "trap 'sleep 0.3; echo \"task saved\" >> {log}; exit 143' TERM\n"
    "while true; do sleep 0.05; done\n"
)


def test_slurm_usr1_checkpoints_then_requeues(tmp_path):
    code, calls = _run_sbatch_script(
        tmp_path, TRAINING.format(log=tmp_path / "calls.log"), send_usr1=True
    )
    assert calls[0].startswith("srun --label --kill-on-bad-exit=1 --cpus-per-task=8 bash -c ")
    train = "selfsup train --config configs/mae_vit_in1k.py:variant=B/16 --workdir /shared/runs/b16"
    assert calls[0].endswith(f" selfsup-task {train} --config.batch_size=4096")
    assert calls[1:] == ["scancel --signal=TERM 4242", "task saved", "scontrol requeue 4242"]
    assert code == 0


def test_slurm_finished_run_is_not_requeued(tmp_path):
    code, calls = _run_sbatch_script(tmp_path, "exit 0\n", send_usr1=False)
    assert code == 0 and len(calls) == 1 and calls[0].startswith("srun ")


def test_slurm_failed_run_is_not_requeued(tmp_path):
    # A crash (not the 143 of a saved stop) must not loop through requeues.
    code, calls = _run_sbatch_script(
        tmp_path, "trap 'exit 1' TERM\nwhile true; do sleep 0.05; done\n", send_usr1=True
    )
    assert code == 1 and not any(c.startswith("scontrol") for c in calls)


# --- launch/tpu.py --------------------------------------------------------------------------------

TPU_ARGS = [
    "--name=mae-pod",
    "--zone=us-central2-b",
    "--accelerator-type=v4-32",
    "--config=configs/quickstart.py",
    "--workdir=/mnt/runs/qs",
    "--config.batch_size=1024",
]


def _commands(text: str) -> list[list[str]]:
    return [shlex.split(line) for line in text.splitlines() if line and not line.startswith("#")]


def test_tpu_dry_run_prints_every_command(tmp_path):
    proc = _launch("tpu.py", *TPU_ARGS, "--spot", "--local-path", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    describe, create, tar, scp, install, start, stream = _commands(proc.stdout)
    zone = "--zone=us-central2-b"
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert describe == [*tpu, "describe", "mae-pod", "--format=value(state,acceleratorType)", zone]
    flags = ["--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", zone, "--spot"]
    assert create == [*tpu, "create", "mae-pod", *flags]
    assert tar[0] == "tar" and tar[-3:] == ["-C", str(tmp_path), "."]
    archive = tar[tar.index("-czf") + 1]
    assert scp == [*tpu, "scp", archive, "mae-pod:selfsup.tar.gz", "--worker=all", zone]
    for ssh in (install, start):
        assert ssh[:7] == [*tpu, "ssh", "mae-pod", "--worker=all"] and ssh[-1] == zone
    assert stream[:7] == [*tpu, "ssh", "mae-pod", "--worker=0"]  # only worker 0's log streams
    assert 'tar -xzf "$HOME/selfsup.tar.gz"' in install[7]
    assert 'pip install -q -e "$HOME/selfsup"' in install[7]  # a local workdir: no gcs extra
    run = start[7].removeprefix("--command=")
    assert "setsid nohup bash -c" in run
    assert "selfsup train --config configs/quickstart.py --workdir /mnt/runs/qs " in run
    assert "--config.batch_size=1024" in run


def test_tpu_settings_file_and_git_checkout(tmp_path):
    settings = tmp_path / "pod.py"
    settings.write_text(
        "def get_config():\n"
        "    return dict(name='from-file', zone='europe-west4-b',\n"
        "                accelerator_type='v5litepod-16', preemptible=True,\n"
        "                git_repo='https://example.org/selfsup.git', git_ref='v0.1',\n"
        "                setup=['sudo mount /mnt'], env={'XLA_FLAGS': '--a --b'})\n"
    )
    args = ["--settings", str(settings), "--name=from-flag", "--config=c.py", "--workdir=/mnt/w"]
    proc = _launch("tpu.py", *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    describe, create, install, start, _ = _commands(proc.stdout)  # no copy step for git
    assert describe[5] == "from-flag"  # flags win over the file
    assert "--version=v2-alpha-tpuv5-lite" in create and "--preemptible" in create
    assert "--zone=europe-west4-b" in create
    script = install[7]
    assert script.index("sudo mount /mnt") < script.index("git fetch")
    assert "git fetch -q --depth=1 https://example.org/selfsup.git v0.1" in script
    assert "export XLA_FLAGS='--a --b'" in start[7]


@pytest.mark.parametrize(
    "drop, message",
    [
        ("--zone", "setting 'zone' is missing: pass --zone"),
        ("--accelerator-type", "setting 'accelerator_type' is missing: pass --accelerator-type"),
    ],
)
def test_tpu_missing_required_setting_is_a_clear_error(drop, message):
    args = [a for a in TPU_ARGS if not a.startswith(drop)]
    proc = _launch("tpu.py", *args, "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tpu.py: error: {message} or set it in --settings"


def test_tpu_name_must_be_a_valid_tpu_name():
    args = [a if not a.startswith("--name") else "--name=My_Pod;rm" for a in TPU_ARGS]
    proc = _launch("tpu.py", *args, "--dry-run")
    assert proc.returncode == 2 and "TPU names are lowercase letters" in proc.stderr


def test_tpu_unknown_generation_needs_a_runtime_version():
    args = [a if not a.startswith("--acc") else "--accelerator-type=v9x-8" for a in TPU_ARGS]
    proc = _launch("tpu.py", *args, "--dry-run")
    assert proc.returncode == 2 and "pass --runtime-version" in proc.stderr
    proc = _launch("tpu.py", *args, "--runtime-version=custom", "--dry-run")
    assert proc.returncode == 0 and "--version=custom" in proc.stdout


def _fake_gcloud(tmp_path: Path, describe: str) -> tuple[dict, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "gcloud.log"
    bin_dir.mkdir()
    # Logs its sub-command; `describe` answers as given (exit 1: no such TPU).
    _stand_in(
        bin_dir,
        "gcloud",
        f'echo "$4" >> {log}\nif [ "$4" = describe ]; then {describe}; fi\n',
    )
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}, log


def test_tpu_creates_a_missing_slice_then_installs_and_trains(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "marker.txt").write_text("x")
    env, log = _fake_gcloud(tmp_path, "exit 1")
    proc = _launch("tpu.py", *TPU_ARGS, "--local-path", str(code), env=env)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    archive = tmp_path / "selfsup-mae-pod.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True)
    assert "./marker.txt" in listing.stdout.split()


def test_tpu_reuses_a_ready_slice_and_refuses_a_different_one(tmp_path):
    env, log = _fake_gcloud(tmp_path, "printf 'READY\\tv4-32\\n'; exit 0")
    args = [*TPU_ARGS, "--git-repo=https://example.org/s.git", "--git-ref=main"]
    proc = _launch("tpu.py", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().split() == ["describe", "ssh", "ssh", "ssh"]  # no create
    other = [a if not a.startswith("--acc") else "--accelerator-type=v4-64" for a in args]
    proc = _launch("tpu.py", *other, env=env)
    assert proc.returncode == 2 and "exists as v4-32, not v4-64" in proc.stderr


def _worker_script(*args: str, index: int = -1) -> str:
    """The bash script of the `index`th command of the dry run (its --command=)."""
    proc = _launch("tpu.py", *args, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    return _commands(proc.stdout)[index][7].removeprefix("--command=")


def test_tpu_gs_workdir_installs_the_gcs_extra():
    args = [a if not a.startswith("--workdir") else "--workdir=gs://bucket/qs" for a in TPU_ARGS]
    proc = _launch("tpu.py", *args, "--git-repo=r", "--git-ref=main", "--dry-run")
    install = _commands(proc.stdout)[2][7]
    assert 'pip install -q -e "$HOME/selfsup[gcs]"' in install


def test_tpu_logs_and_stop_need_only_name_and_zone():
    where = ["--name=mae-pod", "--zone=us-central2-b"]
    (logs,) = _commands(_launch("tpu.py", *where, "--logs", "--dry-run").stdout)
    assert logs[5:7] == ["mae-pod", "--worker=0"] and "tail -c" in logs[7]
    stop, stream = _commands(_launch("tpu.py", *where, "--stop", "--dry-run").stdout)
    assert stop[6] == "--worker=all" and 'kill -TERM -- "-$(cat' in stop[7]
    assert stream == logs  # then follows the run to its end
    proc = _launch("tpu.py", *where, "--dry-run")
    assert proc.returncode == 2 and "setting 'accelerator_type' is missing" in proc.stderr


def test_tpu_run_survives_a_dropped_connection_and_stops_with_a_checkpoint(tmp_path):
    """The worker-side scripts, run by bash here: the start returns while training goes on in
    its own session; killing the streaming (a dropped ssh connection) leaves it running; --stop
    sends SIGTERM, and the stream shows the run saving and ending."""
    start = _worker_script(*TPU_ARGS, "--git-repo=r", "--git-ref=main", index=-2)
    where = ["--name=mae-pod", "--zone=us-central2-b"]
    stream = _worker_script(*where, "--logs")
    stop = _worker_script(*where, "--stop", index=0)
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "selfsup").mkdir(parents=True)
    bin_dir.mkdir()
    # The stand-in training, one Python process like selfsup: runs until SIGTERM, then saves
    # and exits 143.
    (bin_dir / "selfsup").write_text(
        f"#!{sys.executable}\n"
        "import signal, sys, time\n"
        "print('selfsup', *sys.argv[1:], flush=True)\n"
        "print('step 1', flush=True)\n"
        "def stop(signum, frame):\n"
        "    print('checkpoint saved', flush=True)\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    (bin_dir / "selfsup").chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    logs = home / "selfsup-logs"
    (logs).mkdir()
    (logs / "mae-pod.log").write_text("an earlier run\n")

    def bash(script: str, **kw):
        return subprocess.run(["bash", "-c", script], env=env, timeout=60, **kw)

    assert bash(start, capture_output=True).returncode == 0  # returned, training goes on
    pid = int((logs / "mae-pod.pid").read_text())
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: no SIGHUP from ssh
    refused = bash(start, capture_output=True, text=True)
    assert refused.returncode == 1 and "a run is going on mae-pod already" in refused.stderr

    out = tmp_path / "streamed.txt"
    with open(out, "w") as f:
        streaming = subprocess.Popen(["bash", "-c", stream], env=env, stdout=f)
    deadline = time.monotonic() + 30
    while "step 1" not in out.read_text():
        assert time.monotonic() < deadline, "the stream never showed the run's output"
        time.sleep(0.05)
    streaming.kill()  # the connection drops
    streaming.wait(timeout=30)
    os.kill(pid, 0)  # the run is still there

    assert bash(stop).returncode == 0
    tail = bash(stream, capture_output=True, text=True)  # follows the run to its end
    assert tail.stdout.splitlines() == [
        "selfsup train --config configs/quickstart.py --workdir /mnt/runs/qs "
        "--config.batch_size=1024",
        "step 1",
        "checkpoint saved",
        "selfsup: exited with status 143",
    ]
    assert (logs / "mae-pod.log").read_text().startswith("an earlier run\nselfsup train")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
