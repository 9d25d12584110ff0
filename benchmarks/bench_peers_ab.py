"""The headline table as paired rounds: `serve run` and mlx_lm.server in turn, ratios per round.

    python -m benchmarks peers-ab [--rounds 3] [--config serve_config.yaml]
                                        [--model smollm2-135m-instruct] [--peer-weights /tmp/smollm2-f32]
                                        [--out docs/results/peers_ab_cpu.json]

On a small shared machine the speed of the box drifts by as much as the gap between the servers
(mlx_lm.server itself measured 13.2 and 11.3 tok/s at 1 client five minutes apart). So each round
runs bench_peers against ours (`serve run CONFIG`, every model loaded) and then against
mlx_lm.server (the same weights exported to float32, OpenBLAS preloaded, as in docs/benchmarks.md),
and the report gives each round's ours/peer ratio next to the medians. Only one server runs at a
time. The peer weights are exported first if the folder is missing. Prints progress to stderr,
then JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .bench_http import start_serve, stop_serve
from .bench_peers import run as run_peers
from .client import model_states
from .report import emit

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PEER_PORT = 8081
ROWS = [
    ("single TTFT p50 (ms)", "single_ttft_p50_ms", "lower"),
    ("1 client tok/s", "tok_s_1", "higher"),
    ("5 clients tok/s", "tok_s_5", "higher"),
    ("16 clients tok/s", "tok_s_16", "higher"),
    ("cold ~1k-token TTFT (s)", "cold_1k_ttft_s", "lower"),
    ("errors", "errors", "lower"),
]


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


def peers_args(label: str, base_url: str, model: str, waves: int) -> argparse.Namespace:
    return argparse.Namespace(label=label, base_url=base_url, model=model, waves=waves)


def bench_ours(config: str, model: str, waves: int) -> dict:
    proc, ready_s = start_serve(config)
    try:
        deadline = time.time() + 300
        while any(s != "loaded" for s in model_states().values()) and time.time() < deadline:
            time.sleep(1)  # the other models too: ours is measured with all of them loaded
        say(f"ours up in {ready_s:.0f} s: {model_states()}")
        return asyncio.run(run_peers(peers_args("ours", "http://127.0.0.1:8000", model, waves)))
    finally:
        stop_serve(proc)


def bench_mlx_lm_server(weights: str, waves: int) -> dict:
    from engine.loading.cpu_fast_path import find_openblas

    blas = find_openblas()
    env = {**os.environ, **({"LD_PRELOAD": blas} if blas else {})}
    server = subprocess.Popen(
        [PY, "-m", "mlx_lm", "server", "--model", weights, "--port", str(PEER_PORT)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PEER_PORT}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        say("mlx_lm.server up")
        return asyncio.run(run_peers(peers_args("mlx_lm.server", f"http://127.0.0.1:{PEER_PORT}", weights, waves)))
    finally:
        server.terminate()
        server.wait(30)


def paired(rounds: list[dict]) -> dict:
    """Per row: each round's ours/peer ratio, the median ratio, and how many rounds ours won."""
    out = {}
    for _, key, better in ROWS:
        pairs = [(r["ours"]["rows"][key], r["peer"]["rows"][key]) for r in rounds]
        ratios = [round(a / b, 3) if b else None for a, b in pairs]
        wins = sum((a <= b) if better == "lower" else (a > b) for a, b in pairs)
        known = [x for x in ratios if x is not None]
        out[key] = {
            "ours": [a for a, _ in pairs],
            "peer": [b for _, b in pairs],
            "ratio": ratios,
            "median_ratio": statistics.median(known) if known else None,
            "ours_won": f"{wins}/{len(pairs)}",
        }
    return out


def table(summary: dict) -> str:
    lines = ["| | ours, per round | mlx_lm.server, per round | ours/peer, median | ours won |", "|---|---|---|---|---|"]
    for name, key, _ in ROWS:
        s = summary[key]
        lines.append(
            f"| {name} | {' / '.join(map(str, s['ours']))} | {' / '.join(map(str, s['peer']))} | "
            f"{s['median_ratio']} | {s['ours_won']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default="serve_config.yaml")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--peer-weights", default="/tmp/smollm2-f32")
    p.add_argument("--waves", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if not Path(args.peer_weights).exists():
        subprocess.run([PY, "-m", "engine.cli", "export", args.model, args.peer_weights, "--dequantize"], check=True)
    rounds = []
    for i in range(args.rounds):
        say(f"round {i + 1}/{args.rounds}")
        rounds.append(
            {
                "ours": bench_ours(args.config, args.model, args.waves),
                "peer": bench_mlx_lm_server(args.peer_weights, args.waves),
            }
        )
    summary = paired(rounds)
    emit(
        {"config": args.config, "model": args.model, "cpus": os.cpu_count(), "rounds": rounds, "paired": summary},
        table(summary),
        args.out,
    )


if __name__ == "__main__":
    main()
