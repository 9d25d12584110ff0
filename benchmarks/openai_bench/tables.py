"""Markdown tables, the JSON document and PNG plots of one run's results.

The results document: {"machine", "settings", "targets": [{"label", "base_url", "models": [{"name",
"request_name", "warm_up", "scenarios": {name: result | {"skipped": why}}}]}]}.
"""

from __future__ import annotations

from pathlib import Path

from ..report import fmt, md_table


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def entries(doc: dict, scenario: str):
    """(target label, model name, scenario result) for every model that ran `scenario`."""
    for t in doc["targets"]:
        for m in t["models"]:
            res = m.get("scenarios", {}).get(scenario)
            if res is not None:
                yield t["label"], m["name"], res


def _skipped(rows: list, label: str, name: str, res: dict, width: int) -> bool:
    if "skipped" in res:
        rows.append([label, name, f"skipped: {res['skipped']}"] + [""] * (width - 3))
        return True
    return False


def batching_table(doc: dict) -> str:
    head = [
        "server",
        "model",
        "single tok/s",
        "N concurrent tok/s",
        "speedup",
        "tokens/req (single / N)",
        "TTFT p50 ms (single / N)",
        "errors",
    ]
    rows = []
    for label, name, r in entries(doc, "batching"):
        if _skipped(rows, label, name, r, len(head)):
            continue
        s, c = r["single"], r["concurrent"]
        rows.append(
            [
                label,
                name,
                s["tok_s"],
                f"{fmt(c['tok_s'])} (N={r['batch']})",
                fmt(r["speedup"], "x"),
                f"{fmt(s['tokens_per_request'])} / {fmt(c['tokens_per_request'])}",
                f"{fmt(s['ttft_p50_ms'])} / {fmt(c['ttft_p50_ms'])}",
                s["errors"] + c["errors"],
            ]
        )
    return md_table(head, rows)


def streaming_table(doc: dict) -> str:
    head = ["server", "model", "TTFT p50 ms", "TTFT p99 ms", "generation tok/s", "tokens/req", "chunks/req", "errors"]
    rows = []
    for label, name, r in entries(doc, "streaming"):
        if not _skipped(rows, label, name, r, len(head)):
            rows.append(
                [
                    label,
                    name,
                    r["ttft_p50_ms"],
                    r["ttft_p99_ms"],
                    r["gen_tok_s_p50"],
                    r["tokens_per_request"],
                    r["chunks_per_request"],
                    r["errors"],
                ]
            )
    return md_table(head, rows)


def prefix_tables(doc: dict) -> str:
    head = ["Step", "Description", "Expected", "Actual", "tokens reused", "cached_tokens (usage)", "Status"]
    out = []
    for label, name, r in entries(doc, "prefix"):
        why = (
            "its cache stats have no hit/miss counters (prefix cache off?)"
            if r.get("stats_reachable")
            else "no cache stats endpoint"
        )
        out.append(
            f"**{label} / {name}**"
            + (
                ""
                if r.get("stats_endpoint")
                else f" ({why}: Actual is n/a; Status from usage.cached_tokens where reported)"
            )
        )
        if "skipped" in r:
            out.append(f"skipped: {r['skipped']}")
            continue
        rows = [
            [
                s["step"],
                s["description"],
                s["expected"],
                s["actual"],
                s["tokens_reused"],
                f"{fmt(s['cached_tokens'])} of {fmt(s['prompt_tokens'])}",
                s["status"] if not s["error"] else f"error: {s['error']}",
            ]
            for s in r["rows"]
        ]
        out.append(md_table(head, rows))
    return "\n\n".join(out)


def paged_table(doc: dict) -> str:
    head = [
        "server",
        "model",
        "users",
        "prompt tok/user (cached)",
        "paged",
        "peak blocks used (block size)",
        "peak pool KV",
        "peak engine KV",
        "one copy per user",
        "floor",
        "saving: pool / engine / best",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "tok/s",
        "errors",
    ]
    rows = []
    for label, name, r in entries(doc, "paged"):
        if _skipped(rows, label, name, r, len(head)):
            continue
        m = r.get("memory") or {}
        blocks = "n/a" if m.get("peak_blocks_used") is None else f"{m['peak_blocks_used']} ({m['block_size']})"
        cached = r["cached_tokens_total"] / max(1, r["ok"])
        rows.append(
            [
                label,
                name,
                r["users"],
                f"{fmt(r['prompt_tokens_per_user'])} ({cached:.0f})",
                fmt(m.get("paged")),
                blocks,
                mib(m.get("peak_pool_bytes")),
                mib(m.get("peak_engine_kv_bytes")),
                mib(m.get("unshared_kv_bytes")),
                mib(m.get("floor_kv_bytes")),
                " / ".join(pct(m.get(k)) for k in ("saving", "saving_engine", "best_saving")),
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
                r["tok_s"],
                r["errors"],
            ]
        )
    return md_table(head, rows)


def sweep_table(doc: dict) -> str:
    head = [
        "server",
        "model",
        "concurrency",
        "requests",
        "tok/s",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "ITL p50 ms",
        "ITL p99 ms",
        "TPOT p50 ms",
        "tokens/req",
        "errors",
    ]
    rows = []
    for label, name, r in entries(doc, "sweep"):
        if _skipped(rows, label, name, r, len(head)):
            continue
        for lv in r["levels"]:
            rows.append(
                [
                    label,
                    name,
                    lv["concurrency"],
                    lv["requests"],
                    lv["tok_s"],
                    lv["ttft_p50_ms"],
                    lv["ttft_p99_ms"],
                    lv["itl_p50_ms"],
                    lv["itl_p99_ms"],
                    lv["tpot_p50_ms"],
                    lv["tokens_per_request"],
                    lv["errors"],
                ]
            )
        for c in r.get("skipped_levels", []):
            rows.append([label, name, c, "skipped: time budget"] + [""] * (len(head) - 4))
    return md_table(head, rows)


def cpu_table(doc: dict) -> str | None:
    """Cores busy per process group during each scenario (runs with --cpu-profile)."""
    rows = []
    for t in doc["targets"]:
        for m in t["models"]:
            for name, res in m.get("scenarios", {}).items():
                if res.get("cpu_cores") is not None:
                    busy = ", ".join(f"{g} {c:.2f}" for g, c in list(res["cpu_cores"].items())[:6])
                    rows.append([t["label"], m["name"], name, res.get("duration_s"), busy or "n/a"])
    return md_table(["server", "model", "scenario", "seconds", "cores busy, by process"], rows) if rows else None


def error_lines(doc: dict) -> list[str]:
    """Every error kind with its count and where it happened: shown under the tables."""
    lines = []

    def walk(node, where: str):
        if isinstance(node, dict):
            for kind, n in (node.get("error_kinds") or {}).items():
                lines.append(f"- {where}: {n} x {kind}")
            for k, v in node.items():
                if k != "error_kinds":
                    walk(v, f"{where} {k}" if k not in ("scenarios", "single", "concurrent") else where)
        elif isinstance(node, list):
            for item in node:
                label = f"c={item['concurrency']}" if isinstance(item, dict) and "concurrency" in item else ""
                walk(item, f"{where} {label}".rstrip())

    for t in doc["targets"]:
        for m in t["models"]:
            where = f"{t['label']} / {m['name']}"
            if m.get("warm_up") and not m["warm_up"].get("ok"):
                lines.append(f"- {where} warm-up: {m['warm_up'].get('error')}")
            for name, res in m.get("scenarios", {}).items():
                walk(res, f"{where} {name}")
                for s in res.get("rows", []) if name == "prefix" else []:
                    if s.get("error"):
                        lines.append(f"- {where} prefix step {s['step']}: {s['error']}")
    return lines


def merge(docs: list[dict]) -> dict:
    """Several runs' results as one document (one table row per target and model, one plot line
    each): servers measured one after another, in separate invocations. Each target keeps its run."""
    out = {**docs[0], "targets": [], "runs": []}
    for i, doc in enumerate(docs):
        m = doc["machine"]
        out["runs"].append({"date": m["date"], "command": m["command"], "wall_s": doc.get("wall_s")})
        for t in doc["targets"]:
            taken = any(o["label"] == t["label"] for o in out["targets"])
            out["targets"].append({**t, "label": f"{t['label']} (run {i + 1})" if taken else t["label"], "run": i + 1})
    out["wall_s"] = sum(d.get("wall_s") or 0 for d in docs)
    return out


def machine_lines(doc: dict) -> list[str]:
    if doc.get("runs"):  # merged: every run's date and command
        runs = [f"- run {i}: {r['date']}, {r['wall_s']} s: `{r['command']}`" for i, r in enumerate(doc["runs"], 1)]
        return runs + _machine_lines(doc)[1:]
    return _machine_lines(doc)


def _machine_lines(doc: dict) -> list[str]:
    m, s = doc["machine"], doc["settings"]
    out = [
        f"- date: {m['date']}; command: `{m['command']}`",
        f"- machine: {m['platform']}, {m['cpus']} CPUs, {m['memory_gb']} GB RAM",
        f"- client: python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- settings: max_tokens {s['max_tokens']}, prompts `{s['prompt_set']}`, temperature 0, "
        f"concurrency {s['concurrency']}, timeout {s['timeout_s']} s, budget {s['max_duration_s']} s; "
        f"wall time {doc.get('wall_s')} s",
    ]
    for t in doc["targets"]:
        eos = ", ".join(
            f"{m['name']}: {'sent' if m.get('warm_up', {}).get('ignore_eos') else 'refused, not sent'}"
            for m in t["models"]
        )
        run = f", run {t['run']}" if "run" in t else ""
        out.append(f"- target `{t['label']}` {t['base_url']} (ignore_eos {eos}{run})")
    return out


def markdown(doc: dict) -> str:
    parts = ["### Run", "\n".join(machine_lines(doc))]
    sections = [
        ("batching", "Continuous batching: single request vs N concurrent", batching_table),
        ("streaming", "Streaming: time to first token and generation speed", streaming_table),
        ("prefix", "Prefix cache", prefix_tables),
        ("paged", "Paged KV cache: concurrent users sharing a system prompt", paged_table),
        ("sweep", "Concurrency sweep", sweep_table),
    ]
    for key, title, render in sections:
        if key in doc["settings"]["scenarios"]:
            parts += [f"### {title}", render(doc)]
    cpu = cpu_table(doc)
    if cpu:
        parts += ["### CPU by process during each scenario", cpu]
    if doc.get("plots"):
        parts += ["### Plots", "\n".join(f"![{Path(p).stem}]({p})" for p in doc["plots"])]
    errors = error_lines(doc)
    parts += ["### Errors", "\n".join(errors) if errors else "No request failed."]
    return "\n\n".join(parts) + "\n"


def sweep_series(doc: dict) -> list[tuple[str, list[dict]]]:
    return [(f"{label} / {name}", r["levels"]) for label, name, r in entries(doc, "sweep") if r.get("levels")]


def plot_sweep(doc: dict, out_dir: Path, prefix: str) -> list[str]:
    """tok/s vs concurrency, TTFT (p50 solid, p99 dashed) vs concurrency, ITL likewise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sweep_series(doc)
    if not series:
        return []
    specs = [
        ("tok_s", "aggregate completion tok/s", [("tok_s", "-")]),
        ("ttft", "time to first token (ms)", [("ttft_p50_ms", "-"), ("ttft_p99_ms", "--")]),
        ("itl", "inter-token latency (ms, between chunks)", [("itl_p50_ms", "-"), ("itl_p99_ms", "--")]),
    ]
    paths = []
    for key, ylabel, lines in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, levels) in enumerate(series):
            xs = [lv["concurrency"] for lv in levels]
            for field, style in lines:
                ys = [lv[field] if lv[field] is not None else float("nan") for lv in levels]
                tag = "" if len(lines) == 1 else f" {field.split('_')[1]}"
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{name}{tag}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["settings"]["concurrency"], [str(c) for c in doc["settings"]["concurrency"]])
        ax.set(xlabel="concurrent clients", ylabel=ylabel, title=f"{ylabel} vs concurrency")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = out_dir / f"{prefix}_sweep_{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
