"""Ctrl-C, measured: how long `serve run` takes to stop when a terminal's Ctrl-C reaches it.

Each run starts `serve run CONFIG` in its own process group, waits until /health is ok, sends
one chat request, then sends SIGINT to the whole group (what a terminal does: Ray's daemons get
it too) and times the exit. It records the exit code and any Ray process still alive two seconds
later (then cleans up with `ray stop --force` for the next run). Prints JSON and a table.

    python -m benchmarks shutdown [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from benchmarks.bench_governor import start
from benchmarks.client import BASE, model_cards
from benchmarks.metrics import percentile
from benchmarks.report import machine, md_table, write_json
from deployments import launch

RAY_DAEMONS = ("gcs_server", "raylet", "ServeController", "ServeReplica", "ProxyActor")


def leftovers() -> list[str]:
    alive = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(d in cmd for d in RAY_DAEMONS):
            alive.append(f"{p.info['pid']} {cmd[:60]}")
    return alive


def one_run(cfg: dict, timeout_s: float) -> dict:
    proc = start(cfg)
    model = list(model_cards())[0]
    httpx.post(
        f"{BASE}/v1/chat/completions",
        timeout=120,
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t0
    time.sleep(2)
    left = leftovers()
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
    launch.ray_stop()
    return {"exit_code": code, "seconds": round(seconds, 2), "ray_processes_left": left}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_config.yaml")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--timeout-s", type=float, default=120, help="a run that has not exited by then counts as hung")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text())
    runs = []
    for i in range(args.runs):
        runs.append(one_run(cfg, args.timeout_s))
        r = runs[-1]
        print(
            f"run {i + 1}/{args.runs}: exit {r['exit_code']} after {r['seconds']} s, "
            f"{len(r['ray_processes_left'])} Ray processes left",
            file=sys.stderr,
            flush=True,
        )
    secs = [r["seconds"] for r in runs]
    summary = {
        "runs": len(runs),
        "clean": sum(r["exit_code"] == 0 and not r["ray_processes_left"] for r in runs),
        "seconds_p50": percentile(secs, 50),
        "seconds_max": max(secs),
    }
    doc = {"benchmark": "bench_shutdown", "machine": machine(), "config": args.config, "summary": summary, "runs": runs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_json(doc, Path(args.out) / "bench_shutdown_cpu.json", indent=1)
    print(json.dumps(summary, indent=1))
    print(
        md_table(
            ["runs", "exit 0 with no Ray process left", "seconds p50", "seconds max"],
            [[summary["runs"], summary["clean"], f"{summary['seconds_p50']:.1f} s", f"{summary['seconds_max']:.1f} s"]],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
