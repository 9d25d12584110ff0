"""benchmarks.openai_bench: the pure parts (statistics, classification, tables, SSE parsing on a
mock transport), and one bounded run against a real `mlx_lm.server` on the exported SmolLM2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from benchmarks.client import cache_stats, normalize_base, parse_model, parse_target, stream_request
from benchmarks.metrics import RequestResult, percentile, summarize, tpot
from benchmarks.openai_bench import tables
from benchmarks.openai_bench.__main__ import main
from benchmarks.openai_bench.cpu import CpuSampler, group_of
from benchmarks.openai_bench.prompts import prefix_steps, system_prompt
from benchmarks.openai_bench.scenarios import classify_delta, classify_usage, paged_memory, prefix_status

ROOT = Path(__file__).resolve().parents[2]


def ok_result(ttft: float, chunks: list[float], tokens: int) -> RequestResult:
    return RequestResult(
        ok=True,
        ttft=ttft,
        latency=chunks[-1],
        chunk_times=chunks,
        completion_tokens=tokens,
        tokens_from_usage=True,
        prompt_tokens=10,
    )


# --- statistics ---------------------------------------------------------------------------------


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([None, 3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == 99
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5


def test_summarize_counts_errors_and_excludes_them_from_latency():
    results = [
        ok_result(0.1, [0.1, 0.2, 0.3], 3),
        ok_result(0.3, [0.3, 0.5], 2),
        RequestResult(error="HTTP 503: busy", status=503),
        RequestResult(error="HTTP 503: busy", status=503),
        RequestResult(error="timeout (ReadTimeout)"),
    ]
    s = summarize(results, wall_s=1.0)
    assert (s["requests"], s["ok"], s["errors"]) == (5, 2, 3)
    assert s["error_kinds"] == {"HTTP 503: busy": 2, "timeout (ReadTimeout)": 1}
    assert s["completion_tokens"] == 5 and s["tok_s"] == 5.0 and s["tokens_per_request"] == 2.5
    assert s["ttft_p50_ms"] == 200.0
    assert s["itl_p50_ms"] == 100.0 and s["itl_p99_ms"] == pytest.approx(198.0)
    assert tpot(results[1]) == pytest.approx(0.2)


def test_summarize_all_failed():
    s = summarize([RequestResult(error="ConnectError: refused")], wall_s=0.5)
    assert s["ok"] == 0 and s["errors"] == 1 and s["tok_s"] is None and s["ttft_p50_ms"] is None


# --- prefix and paged classification --------------------------------------------------------------


def test_classify_delta_and_usage():
    before = {"hits": 1, "misses": 2, "prefix_hits": 0, "tokens_reused": 10}
    assert classify_delta(before, {**before, "hits": 2, "tokens_reused": 50}) == ("HIT", 40)
    assert classify_delta(before, {**before, "misses": 3}) == ("MISS", 0)
    assert classify_delta(before, before) == ("none", 0)
    assert classify_delta(None, before) == (None, None)
    assert classify_delta({"enabled": False}, {"enabled": False}) == (None, None)
    assert classify_usage(None, 10) is None
    assert [classify_usage(c, 100) for c in (0, 99, 100, 40)] == ["MISS", "HIT", "HIT", "PREFIX_HIT"]
    assert prefix_status("HIT", "HIT", "MISS") == "ok"
    assert prefix_status("MISS", "PREFIX_HIT", None) == "MISMATCH"
    assert prefix_status("MISS", None, "MISS") == "ok (usage)"
    assert prefix_status("MISS", None, None) == "n/a"


def test_prefix_steps_prompts():
    steps = prefix_steps("abc123")
    assert [s["expected"] for s in steps] == ["MISS", "HIT", "MISS", "HIT", "PREFIX_HIT"]
    a, b, a2 = steps[0]["prompt"], steps[2]["prompt"], steps[4]["prompt"]
    assert steps[1]["prompt"] == a and a.split()[0] != b.split()[0] and a2 != a and a2[:400] == a[:400]
    assert prefix_steps("other")[0]["prompt"] != a  # each run starts cold
    assert 300 <= len(system_prompt("n").split()) <= 420


def test_paged_memory_saving():
    cache = {"enabled": True, "block_size": 32, "block_bytes": 32 * 100}
    results = [ok_result(0.1, [0.1, 0.2], 10) for _ in range(10)]  # 10 prompt + 10 completion each
    for r in results[1:]:
        r.cached_tokens = 8  # the shared part of the prompt
    m = paged_memory({"blocks_used": 4, "bytes_used": 4 * 3200, "kv_cache_bytes": 16000}, cache, results)
    assert m["unshared_kv_bytes"] == 10 * 20 * 100 and m["saving"] == pytest.approx(1 - 12800 / 20000, abs=1e-3)
    assert m["floor_kv_bytes"] == (200 - 72) * 100 and m["best_saving"] == pytest.approx(0.36)
    assert m["saving_engine"] == pytest.approx(0.2)
    off = paged_memory({"kv_cache_bytes": 5000}, {"enabled": False}, results)
    assert off["peak_engine_kv_bytes"] == 5000 and off["peak_pool_bytes"] is None and off["saving"] is None


# --- targets ------------------------------------------------------------------------------------


def test_targets_and_models():
    assert normalize_base("http://h:8000/v1/") == "http://h:8000"
    assert parse_model("smol=/tmp/dir").request_name == "/tmp/dir" and parse_model("smol=/tmp/dir").name == "smol"
    t = parse_target(["ours=http://127.0.0.1:8000/v1"], ["a", "b=c"], "key")
    assert (t.label, t.base_url, t.api_key) == ("ours", "http://127.0.0.1:8000", "key")
    assert [m.name for m in t.models] == ["a", "b"] and t.models[1].request_name == "c"
    assert [m.request_name for m in parse_target(["x=http://h", "m1"], ["a"], None).models] == ["m1"]
    with pytest.raises(ValueError):
        parse_target(["http://h"], ["a"], None)
    with pytest.raises(ValueError):
        parse_target(["x=http://h"], [], None)
    with pytest.raises(SystemExit):
        main(["--model", "m"])  # no server given
    with pytest.raises(SystemExit):
        main(["--base-url", "http://h", "--model", "m", "--scenarios", "nope"])


# --- the HTTP client on a mock transport ----------------------------------------------------------


def sse(*events) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def chunk(text=None, finish=None, usage=None):
    out = {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}
    return {**out, "usage": usage} if usage else out


def mock_client(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test")


async def test_stream_request_parses_sse_and_usage():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 6}}
    body = sse(chunk("He"), chunk("llo"), chunk(None, "length"), {"choices": [], "usage": usage}, b"[DONE]")
    async with mock_client(lambda req: httpx.Response(200, content=body)) as c:
        r = await stream_request(c, "/v1/chat/completions", {"model": "m"})
    assert r.ok and r.text == "Hello" and r.finish_reason == "length" and len(r.chunk_times) == 2
    assert (r.completion_tokens, r.tokens_from_usage, r.prompt_tokens, r.cached_tokens) == (3, True, 7, 6)
    assert r.ttft is not None and r.latency >= r.ttft


async def test_stream_request_errors_are_results():
    err = {"error": {"message": "model 'x' is not hosted here", "type": "invalid_request_error"}}
    async with mock_client(lambda req: httpx.Response(404, json=err)) as c:
        r = await stream_request(c, "/v1/chat/completions", {})
    assert not r.ok and r.status == 404 and r.error == "HTTP 404: model 'x' is not hosted here"
    async with mock_client(lambda req: httpx.Response(200, content=sse(chunk("a")))) as c:
        r = await stream_request(c, "/v1/completions", {})
    assert not r.ok and r.error == "stream ended without [DONE]" and r.completion_tokens == 1
    mid = sse(chunk("a"), {"error": {"message": "engine died"}}, b"[DONE]")
    async with mock_client(lambda req: httpx.Response(200, content=mid)) as c:
        r = await stream_request(c, "/v1/completions", {})
    assert not r.ok and "engine died" in r.error

    def refuse(req):
        raise httpx.ConnectError("connection refused")

    async with mock_client(refuse) as c:
        r = await stream_request(c, "/v1/completions", {})
        assert await cache_stats(c, "m") is None
    assert not r.ok and r.error.startswith("ConnectError")


async def test_cache_stats_shapes():
    ours = {"object": "model.cache", "model": "m", "cache": {"hits": 1}, "engine": {"running": 0}}
    async with mock_client(lambda req: httpx.Response(200, json=ours)) as c:
        assert await cache_stats(c, "m") == {"cache": {"hits": 1}, "engine": {"running": 0}}
    async with mock_client(lambda req: httpx.Response(200, json={"object": "list", "data": []})) as c:
        assert await cache_stats(c, "m") is None  # mlx_lm.server's answer to any /v1/models*
    async with mock_client(lambda req: httpx.Response(200, content=b"")) as c:
        assert await cache_stats(c, "m") is None


# --- report -------------------------------------------------------------------------------------


PREFIX_ROW = {
    "step": 1,
    "description": "First request (prompt A)",
    "expected": "MISS",
    "actual": None,
    "tokens_reused": None,
    "prompt_tokens": 200,
    "cached_tokens": 0,
    "usage_label": "MISS",
    "error": None,
    "status": "ok (usage)",
}
PAGED_MEMORY = {
    "paged": True,
    "block_size": 32,
    "peak_blocks_used": 2,
    "peak_pool_bytes": 2**20,
    "peak_engine_kv_bytes": 3 * 2**20,
    "unshared_kv_bytes": 4 * 2**20,
    "floor_kv_bytes": 2**19,
    "saving": 0.75,
    "saving_engine": 0.25,
    "best_saving": 0.875,
}
MACHINE = {
    "date": "d",
    "platform": "p",
    "cpus": 2,
    "memory_gb": 24,
    "python": "3.11",
    "packages": {"httpx": "0.28"},
    "command": "cmd",
}


def sample_doc() -> dict:
    level = summarize([ok_result(0.1, [0.1, 0.2, 0.3], 3)], 0.5)
    bad = summarize([RequestResult(error="HTTP 503: queue full")], 0.1)
    scen = {
        "batching": {"single": level, "concurrent": bad, "batch": 5, "speedup": None},
        "streaming": {"skipped": "time budget spent"},
        "prefix": {"stats_endpoint": False, "rows": [dict(PREFIX_ROW)]},
        "paged": {
            **level,
            "users": 1,
            "prompt_tokens_per_user": 10,
            "cached_tokens_total": 0,
            "memory": dict(PAGED_MEMORY),
        },
        "sweep": {"levels": [{"concurrency": 1, **level}, {"concurrency": 2, **bad}], "skipped_levels": [4]},
    }
    settings = {
        "scenarios": list(scen),
        "max_tokens": 8,
        "prompt_set": "seed",
        "concurrency": [1, 2, 4],
        "timeout_s": 60,
        "max_duration_s": 600,
    }
    model = {"name": "m", "request_name": "m", "warm_up": {"ok": True, "ignore_eos": True}, "scenarios": scen}
    return {
        "machine": dict(MACHINE),
        "settings": settings,
        "targets": [{"label": "ours", "base_url": "http://h", "models": [model]}],
    }


def test_markdown_shows_errors_skips_and_na(tmp_path):
    doc = sample_doc()
    md = tables.markdown(doc)
    assert "| ours | m | 6.00 | n/a (N=5) | n/a |" in md  # all 5 concurrent failed: no tok/s, no speedup
    assert "| 1 | First request (prompt A) | MISS | n/a | n/a | 0 of 200 | ok (usage) |" in md
    assert "skipped: time budget spent" in md and "| ours | m | 4 | skipped: time budget |" in md
    assert "- ours / m batching: 1 x HTTP 503: queue full" in md
    assert "- ours / m sweep levels c=2: 1 x HTTP 503: queue full" in md
    assert "| ours | m | 1 | 10 (0) | True | 2 (32) | 1.0 MiB | 3.0 MiB | 4.0 MiB | 0.5 MiB | 75% / 25% / 88% |" in md
    assert md.count("|---|") >= 5
    paths = tables.plot_sweep(doc, tmp_path, "t")
    assert [Path(p).name for p in paths] == ["t_sweep_tok_s.png", "t_sweep_ttft.png", "t_sweep_itl.png"]
    assert all(Path(p).stat().st_size > 1000 for p in paths)


def test_cpu_groups_and_usage():
    assert group_of(["/venv/bin/python", "-m", "mlx_lm", "server", "--port", "1"], "python") == "python -m mlx_lm"
    assert group_of(["ray::ServeReplica:orchard:model-a.handle_request"], "x") == "ray::ServeReplica:orchard:model-a"
    assert group_of(["/usr/bin/python3", "-u", "/x/monitor.py", "--logs"], "p") == "python monitor.py"
    assert group_of(["python3", "-c", "print(1)"], "p") == "python -c" and group_of([], "kworker") == "kworker"
    s = CpuSampler()
    s.samples = [
        (100.0, {(1, 0.0): ("model", 10.0), (2, 0.0): ("proxy", 1.0)}),
        (110.0, {(1, 0.0): ("model", 27.0), (2, 0.0): ("proxy", 1.1), (3, 5.0): ("other", 3.0)}),
    ]
    assert s.usage(100.2, 109.9) == {"model": 1.7, "other": 0.3}  # proxy's 0.01 cores is below the floor
    doc = sample_doc()
    doc["targets"][0]["models"][0]["scenarios"]["batching"]["cpu_cores"] = {"model": 1.7, "other": 0.3}
    assert "| ours | m | batching | n/a | model 1.70, other 0.30 |" in tables.markdown(doc)


# --- one bounded run against a real server -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_lm_server(tmp_path_factory):
    """mlx_lm.server on SmolLM2 exported to a float32 MLX directory (the same weights we serve),
    with one OpenBLAS thread, as the test YAMLs give their replicas: on a 2-core machine beside
    the test worker, a second thread spins against it and each request takes seconds, not one."""
    out = tmp_path_factory.mktemp("smollm2") / "mlx"
    subprocess.run(
        [sys.executable, "-m", "engine.cli", "export", "smollm2-135m-instruct", str(out), "--dequantize"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    port = free_port()
    log = open(out.parent / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(out), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (out.parent / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", str(out)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.slow
def test_run_against_mlx_lm_server(mlx_lm_server, tmp_path, capsys):
    url, model_dir = mlx_lm_server
    code = main(
        [
            "--target",
            f"mlx_lm={url}/v1",
            f"smollm2={model_dir}",
            "--max-tokens",
            "4",
            "--concurrency",
            "1",
            "2",
            "--batch-size",
            "2",
            "--paged-users",
            "2",
            "--out-dir",
            str(tmp_path),
            "--label",
            "t",
            "--no-progress",
            "--max-duration-s",
            "300",
            "--timeout-s",
            "120",
            "--cpu-profile",
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "t.json").read_text())
    scen = doc["targets"][0]["models"][0]["scenarios"]
    assert set(scen) == {"batching", "streaming", "prefix", "paged", "sweep"}
    assert not any("skipped" in s for s in scen.values()), scen
    assert scen["batching"]["single"]["errors"] == 0 and scen["batching"]["concurrent"]["tok_s"] > 0
    assert [lv["concurrency"] for lv in scen["sweep"]["levels"]] == [1, 2]
    assert all(lv["errors"] == 0 and lv["completion_tokens"] > 0 for lv in scen["sweep"]["levels"])
    prefix = scen["prefix"]
    assert prefix["stats_endpoint"] is False and all(r["actual"] is None for r in prefix["rows"])
    assert [r["usage_label"] for r in prefix["rows"]][:2] == ["MISS", "HIT"]  # mlx_lm reports cached_tokens
    assert scen["paged"]["memory"] is None and scen["paged"]["ok"] == 2
    md = (tmp_path / "t.md").read_text()
    assert "### Concurrency sweep" in md and "No request failed." in md
    assert "python -m mlx_lm" in scen["sweep"]["cpu_cores"]  # the server's process did the work
    assert (tmp_path / "t_sweep_tok_s.png").exists() and "| mlx_lm | smollm2 |" in capsys.readouterr().out


def test_merge_runs_keeps_every_target():
    a, b = sample_doc(), sample_doc()
    b["machine"] = {**b["machine"], "date": "later", "command": "cmd2"}
    doc = tables.merge([a, b])
    assert [t["label"] for t in doc["targets"]] == ["ours", "ours (run 2)"]
    md = tables.markdown(doc)
    assert "- run 2: later" in md and "| ours (run 2) | m | 1 | 1 | 6.00 |" in md
