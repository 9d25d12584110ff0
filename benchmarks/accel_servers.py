"""The servers of the accelerator suite (`bench_accel`): `serve run` with a one-model YAML,
mlx_lm.server and vllm-mlx, each a child process on its own port, started and stopped by Python
module rather than by executable (on the lent GPU machine the wheels install under a --target
folder, whose bin/ is not beside the interpreter).

`serve run` is stopped with SIGINT, then `ray stop --force`: never run this suite where another
Ray cluster serves (it is written for the lent machine, which is ours alone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from deployments import launch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SERVE_CLI = "import sys; from ray.serve.scripts import cli; sys.exit(cli())"
RAY_CLI = "import sys; from ray.scripts.scripts import main; sys.exit(main())"
VLLM_MLX_CLI = "import sys; from vllm_mlx.cli import main; sys.exit(main())"
MODEL_NAME = "qwen3-0.6b-8bit"


@dataclass
class Server:
    """One peer or ours, running: where to send requests, what to send as `model`, its log."""

    label: str
    base_url: str
    model: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    ready_s: float | None = None
    error: str | None = None  # why it never served (then proc is None)
    info: dict = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]


def serve_yaml(source: str, max_num_seqs: int, router_replicas: int = 1, gather: bool = True) -> str:
    """The YAML of `serve run` for one model: every setting default but the model, a batch as wide
    as the widest client wave, and `allow_ignore_eos` (every request makes max_tokens tokens);
    `router_replicas` > 1: that many router replicas (`router.num_replicas`); `gather` False: each
    request its own handle call (`router.gather_requests`)."""
    options = (f"        num_replicas: {router_replicas}\n" if router_replicas > 1 else "") + (
        "" if gather else "        gather_requests: false\n"
    )
    router = f"      router:\n{options}" if options else ""
    return f"""proxy_location: HeadOnly
http_options:
  host: 127.0.0.1
  port: 8000
logging_config:
  encoding: TEXT
  log_level: INFO
  enable_access_log: false
applications:
  - name: orchard
    route_prefix: /
    import_path: deployments.app:build_app
    autoscaling_policy:
      policy_function: deployments.governor:governor_policy
    args:
{router}      models:
        - name: {MODEL_NAME}
          source: {source}
          engine:
            max_num_seqs: {max_num_seqs}
          allow_ignore_eos: true
          keep_alive: forever
"""


def _popen(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A child in its own session (Ctrl-C and stop() reach its group), output to LOG; `env` added
    to this process's environment."""
    out = log.open("w")
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env} if env else None,
        start_new_session=True,
        preexec_fn=launch._default_sigint,
    )


def _answers(base_url: str, model: str) -> bool:
    """One completion of 2 tokens came back 200."""
    body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0.0}
    try:
        return httpx.post(f"{base_url}/v1/completions", json=body, timeout=120).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(server: Server, timeout_s: float) -> Server:
    """Until the server answers a completion; on failure, close it and keep why."""
    if server.proc is None:
        return server
    try:
        server.ready_s = round(
            launch.wait_until(
                server.proc,
                lambda: _answers(server.base_url, server.model),
                timeout_s,
                interval_s=0.5,
                failure=f"{server.label} did not answer",
            ),
            1,
        )
    except launch.ServeRunFailed as exc:
        server.error = f"{exc}; log tail: {server.log_tail(1500)}"
        stop(server)
    return server


def ray_stop() -> None:
    subprocess.run([PY, "-c", RAY_CLI, "stop", "--force"], cwd=ROOT, capture_output=True, timeout=120)


def write_yaml(source: str, max_num_seqs: int, workdir: Path, router_replicas: int = 1, gather: bool = True) -> Path:
    config = workdir / "accel_serve.yaml"
    config.write_text(serve_yaml(source, max_num_seqs, router_replicas, gather))
    return config


def launch_serve(config: Path, workdir: Path, env: dict | None = None) -> Server:
    """`serve run CONFIG` on a clean Ray (not waited for: see `wait_ready`), with `env` added to its
    environment (Ray's processes, which it starts, inherit it)."""
    ray_stop()
    log = workdir / "serve_run.log"
    server = Server("serve run", "http://127.0.0.1:8000", MODEL_NAME, log=log)
    server.proc = _popen([PY, "-c", SERVE_CLI, "run", str(config)], log, env)
    server.info = {"config": config.read_text(), "env": dict(env or {})}
    return server


def launch_mlx_lm_server(source: str, port: int, decode_concurrency: int, workdir: Path) -> Server:
    """mlx_lm.server on the same weights, decoding as many requests at once as our engine may."""
    log = workdir / "mlx_lm_server.log"
    server = Server("mlx_lm.server", f"http://127.0.0.1:{port}", source, log=log)
    argv = [PY, "-m", "mlx_lm", "server", "--model", source, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--decode-concurrency", str(decode_concurrency)]
    server.proc = _popen(argv, log)
    server.info = {"argv": argv[1:], "version": _version("mlx-lm")}
    return server


def launch_vllm_mlx(source: str, port: int, max_num_seqs: int, workdir: Path) -> Server:
    """vllm-mlx with continuous batching, if it imports and serves on MLX's CUDA backend."""
    log = workdir / "vllm_mlx.log"
    server = Server("vllm-mlx", f"http://127.0.0.1:{port}", source, log=log)
    try:
        import vllm_mlx  # noqa: F401 - only: is it installed at all

        server.info["version"] = _version("vllm-mlx")
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        server.error = f"import vllm_mlx: {type(exc).__name__}: {exc}"
        return server
    argv = [PY, "-c", VLLM_MLX_CLI, "serve", source, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--continuous-batching", "--max-num-seqs", str(max_num_seqs)]
    server.proc = _popen(argv, log)
    server.info["argv"] = argv[3:]
    return server


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def stop(server: Server, timeout_s: float = 30) -> None:
    """SIGINT to the server's process group, SIGKILL if it lingers; Ray stopped after serve run."""
    proc, server.proc = server.proc, None
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass
    if server.label == "serve run":
        ray_stop()
