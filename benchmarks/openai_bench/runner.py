"""Runs the scenarios for every target and model in turn (one server loaded at a time), with a
progress bar on stderr and a time budget, and writes JSON, markdown and plots."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..client import Target, make_client
from ..report import machine, write_json
from . import tables
from .cpu import CpuSampler
from .scenarios import SCENARIOS, Ctx, OutOfTime, planned_requests, warm_up


def make_ctx(client, target, model, args, deadline, progress, nonce) -> Ctx:
    return Ctx(
        client=client,
        target=target,
        model=model,
        max_tokens=args.max_tokens,
        prompt_set=args.prompts,
        nonce=nonce,
        deadline=deadline,
        progress=progress,
        concurrency=tuple(args.concurrency),
        sweep_min_requests=args.sweep_min_requests,
        batch_size=args.batch_size,
        paged_users=args.paged_users,
    )


async def run_model(ctx: Ctx, names: list[str], bar: tqdm, sampler=None) -> dict:
    out = {"name": ctx.model.name, "request_name": ctx.model.request_name, "scenarios": {}}
    bar.set_description(f"{ctx.target.label}/{ctx.model.name} warm-up")
    out["warm_up"] = await warm_up(ctx)
    for name in names:
        if not out["warm_up"]["ok"]:
            out["scenarios"][name] = {"skipped": "warm-up request failed"}
            continue
        bar.set_description(f"{ctx.target.label}/{ctx.model.name} {name}")
        started = time.time()
        try:
            res = await SCENARIOS[name](ctx)
        except OutOfTime:
            res = {"skipped": "time budget spent"}
        except Exception as exc:  # a bug or a server answering nonsense: shown, never hidden
            res = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:120]}"}
        # wall-clock span, to line the scenario up with a server-side profile
        ended = time.time()
        out["scenarios"][name] = {**res, "started_unix": round(started, 3), "duration_s": round(ended - started, 2)}
        if sampler is not None:
            await asyncio.sleep(sampler.interval_s)  # a sample after the end
            out["scenarios"][name]["cpu_cores"] = sampler.usage(started, ended)
    return out


async def run_all(targets: list[Target], args) -> dict:
    names = args.scenarios
    deadline = time.monotonic() + args.max_duration_s
    nonce = secrets.token_hex(3)
    per_model = planned_requests(make_ctx(None, None, None, args, 0, None, nonce), names)
    total = per_model * sum(len(t.models) for t in targets)
    start = time.monotonic()
    doc = {"machine": machine(), "settings": settings(args), "targets": []}
    sampler = CpuSampler().start() if args.cpu_profile else None
    with tqdm(total=total, unit="req", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True) as bar:
        for target in targets:
            tout = {"label": target.label, "base_url": target.base_url, "models": []}
            max_conn = max([*args.concurrency, args.batch_size, args.paged_users]) + 4
            async with make_client(target, args.timeout_s, max_conn) as client:
                for model in target.models:
                    ctx = make_ctx(client, target, model, args, deadline, bar.update, nonce)
                    tout["models"].append(await run_model(ctx, names, bar, sampler))
            doc["targets"].append(tout)
    if sampler is not None:
        sampler.stop()
    doc["wall_s"] = round(time.monotonic() - start, 1)
    return doc


def settings(args) -> dict:
    keys = (
        "scenarios",
        "max_tokens",
        "prompts",
        "concurrency",
        "batch_size",
        "paged_users",
        "sweep_min_requests",
        "timeout_s",
        "max_duration_s",
        "label",
        "cpu_profile",
    )
    out = {k: getattr(args, k) for k in keys}
    out["prompt_set"] = out.pop("prompts")
    return out


def write_outputs(doc: dict, out_dir: Path, label: str, plots: bool) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc["plots"] = [Path(p).name for p in tables.plot_sweep(doc, out_dir, label)] if plots else []
    paths = {"json": out_dir / f"{label}.json", "markdown": out_dir / f"{label}.md"}
    write_json(doc, paths["json"])
    paths["markdown"].write_text(tables.markdown(doc))
    return {k: str(v) for k, v in paths.items()} | {"plots": ", ".join(str(out_dir / p) for p in doc["plots"])}


def merge_files(paths: list[str], args) -> dict:
    doc = tables.merge([json.loads(Path(p).read_text()) for p in paths])
    files = write_outputs(doc, Path(args.out_dir), args.label, not args.no_plots)
    print(tables.markdown(doc))
    for kind, path in files.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return doc


def run(targets: list[Target], args) -> dict:
    doc = asyncio.run(run_all(targets, args))
    files = write_outputs(doc, Path(args.out_dir), args.label, not args.no_plots)
    print(tables.markdown(doc))
    for kind, path in files.items():
        print(f"{kind}: {path}", file=sys.stderr)
    return doc
