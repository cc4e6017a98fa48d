#!/usr/bin/env python3
"""Run one command as N processes of a multi-process JAX run on this machine, on CPU devices.

For trying the multi-host code path without a cluster:

    python launch/local.py -n 2 -- selfsup train --config configs/quickstart.py:smoke \\
        --workdir /tmp/two

Process i gets SELFSUP_COORDINATOR=127.0.0.1:PORT, SELFSUP_NUM_PROCESSES=N and
SELFSUP_PROCESS_ID=i (read by `selfsup` and `selfsup.parallel.distributed.initialize()`),
JAX_PLATFORMS=cpu and `--devices-per-process` emulated CPU devices; JAX's CPU collectives use
gloo. Every output line is prefixed with `[i] `.

Ctrl-C or SIGTERM is passed on once to every process (they run in their own session, so the
terminal does not signal them a second time): selfsup saves a checkpoint and exits. When a process
fails, the others would wait for it in their next collective: they get SIGTERM after `--grace`
seconds and SIGKILL 10 s later. The exit code is that of the first process to fail (128 + N for
one killed by signal N, as a shell reports it), else 0; a line on stderr names that process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_KILL_AFTER_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, index: int, count: int, port: int, devices: int) -> dict:
    """The environment of process `index` of `count`."""
    env = dict(base)
    env["SELFSUP_COORDINATOR"] = f"127.0.0.1:{port}"
    env["SELFSUP_NUM_PROCESSES"] = str(count)
    env["SELFSUP_PROCESS_ID"] = str(index)
    env["JAX_PLATFORMS"] = "cpu"
    flag = "--xla_force_host_platform_device_count"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{flag}={devices}"])
    env["PYTHONUNBUFFERED"] = "1"  # lines show up as they are printed, not at exit
    return env


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
    # Text mode splits on "\r" too, so a progress bar's updates become separate lines.
    for line in stream:
        end = "" if line.endswith("\n") else "\n"
        with lock:
            out.write(f"[{index}] {line}{end}")
            out.flush()
    stream.close()


def run(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    port: int | None = None,
    grace: float = 30.0,
    out=None,
) -> int:
    """Start `num_processes` copies of `command`, stream their prefixed output, and return the
    first failure's exit code (0 when all succeed)."""
    if num_processes < 1 or devices_per_process < 1:
        raise SystemExit("local.py: --num-processes and --devices-per-process must be >= 1")
    out = out or sys.stdout
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(num_processes):
        proc = subprocess.Popen(
            list(command),
            env=process_env(dict(os.environ), i, num_processes, port, devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # the terminal's Ctrl-C reaches them only through us
        )
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(i, proc.stdout, out, lock)))
        pumps[-1].start()

    def forward(signum, frame):
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
    failed, failed_at, terminated = None, None, False
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process each time
            for i, p in enumerate(procs):
                if failed is None and p.returncode not in (None, 0):
                    failed, failed_at = i, time.monotonic()
            if failed_at is not None:
                waited = time.monotonic() - failed_at
                if waited > grace and not terminated:
                    forward(signal.SIGTERM, None)
                    terminated = True
                if waited > grace + _KILL_AFTER_S:
                    forward(signal.SIGKILL, None)
            time.sleep(0.05)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for thread in pumps:
            thread.join()
    if failed is None:
        failed = next((i for i, p in enumerate(procs) if p.returncode), None)
    if failed is None:
        return 0
    code = procs[failed].returncode
    if code < 0:  # Popen's -N for "killed by signal N"; sys.exit(-9) would exit 247
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        print(f"local.py: process {failed} was killed by {name}", file=sys.stderr)
        return 128 - code
    print(f"local.py: process {failed} exited with code {code}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command as N processes of one multi-process JAX run on CPU devices.",
        usage="%(prog)s -n N [options] -- command ...",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("-d", "--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds to wait after a failure, then stop all"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- selfsup train --config ...")
    return run(
        command,
        args.num_processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        grace=args.grace,
    )


if __name__ == "__main__":
    sys.exit(main())
