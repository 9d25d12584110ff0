"""Run `serve run CONFIG` as a child process: start it, wait for /health, stop it with SIGINT.

For the benchmarks and the end-to-end tests, which drive a real server from outside. No MLX and
no Ray import: it runs the `serve` and `ray` executables installed beside this interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BASE = "http://127.0.0.1:8000"


class ServeRunFailed(RuntimeError):
    """`serve run` exited, or was not ready in time."""


def start(
    config: str | Path, out=subprocess.DEVNULL, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`serve run [ARGS] CONFIG` in its own session (Ctrl-C goes to its whole group), with SIGINT
    at its default whatever this process inherited: started from a background job (`nohup ... &`),
    SIGINT is ignored, stays ignored across exec, and serve run would never shut down on it."""
    return subprocess.Popen(
        [str(BIN / "serve"), "run", *args, str(config)],
        cwd=ROOT,
        stdout=out,
        env=env,
        stderr=subprocess.STDOUT if out is not subprocess.DEVNULL else subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    timeout_s: float,
    interval_s: float = 1.0,
    failure: str = "not ready",
) -> float:
    """Seconds until `ready()` is true; `ServeRunFailed` if the process exits first or time runs out.
    `ready` may raise `OSError` or `ValueError` (server not up yet): that counts as not ready.
    `failure` opens the timeout's message."""
    start_t = time.monotonic()
    while time.monotonic() - start_t < timeout_s:
        if proc.poll() is not None:
            raise ServeRunFailed(f"serve run exited with {proc.returncode}")
        try:
            if ready():
                return time.monotonic() - start_t
        except (OSError, ValueError):
            pass
        time.sleep(interval_s)
    raise ServeRunFailed(f"{failure} after {timeout_s}s")


def health_ok(base: str = BASE, timeout_s: float = 10) -> bool:
    """GET /health answered 200 with `{"status": "ok"}`."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as r:
            return r.status == 200 and json.loads(r.read()).get("status") == "ok"
    except urllib.error.HTTPError:
        return False


def wait_healthy(proc: subprocess.Popen, timeout_s: float = 180, base: str = BASE) -> float:
    """Seconds until /health is ok."""
    return wait_until(proc, lambda: health_ok(base), timeout_s, failure="/health not ok")


def stop(proc: subprocess.Popen, *, group: bool = False, timeout_s: float = 60, stop_ray: bool = True) -> None:
    """SIGINT the `serve run` (a clean shutdown; to its whole process group with `group`, as a
    terminal's Ctrl-C), kill it if it has not exited after `timeout_s`, then `ray stop --force`
    unless told not to."""
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
    if stop_ray:
        ray_stop()


def ray_stop() -> None:
    """`ray stop --force`: stops every local Ray cluster on this machine."""
    subprocess.run([str(BIN / "ray"), "stop", "--force"], cwd=ROOT, capture_output=True, timeout=120)
