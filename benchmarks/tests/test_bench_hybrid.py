"""bench_hybrid end to end on the tiny synthetic:qwen3_5: the document's shape, ours reusing the
system prompt warm and the fallback never."""

import json

from benchmarks import bench_hybrid

# A snapshot every 32 tokens, so the 64-token system prompt ends on one (the engine's default of
# 512 would leave nothing of so short a prompt to resume from).
ARGV = [
    "--model",
    "synthetic:qwen3_5",
    "--system-tokens",
    "64",
    "--repeats",
    "2",
    "--clients",
    "2",
    "--new-tokens",
    "4",
    "--rounds",
    "1",
    "--warmup-rounds",
    "0",
    "--state-interval",
    "32",
]


async def test_the_suite_compares_our_cache_with_the_fallback_on_a_hybrid_model():
    doc = await bench_hybrid.run(bench_hybrid.parser().parse_args(ARGV))
    json.dumps(doc)  # a JSON document
    assert {"machine", "model", "model_info", "params", "engines", "summary", "rounds"} <= doc.keys()
    assert doc["engines"]["ours"]["cache"]["path"] == "paged"
    assert doc["engines"]["fallback"]["cache"]["path"] == "mlx_lm"
    assert len(doc["rounds"]) == 1 and doc["rounds"][0].keys() == {"ours", "fallback"}

    ours, fallback = doc["rounds"][0]["ours"], doc["rounds"][0]["fallback"]
    assert ours["repeated_prompt"]["warm_cached_tokens"] == [64, 64]  # resumed at the system prompt's end
    assert fallback["repeated_prompt"]["warm_cached_tokens"] == [0, 0]
    for run in (ours, fallback):
        clients = run["clients"]
        assert clients["tokens"] == 2 * 4 and clients["peak_batch"] == 2 and clients["kv_bytes_peak"] > 0
        assert clients["sequences_per_gb"] > 0
    assert {"blocks", "states", "snapshots", "working_copies"} == ours["clients"]["kv_bytes_at_peak"].keys()

    summary = doc["summary"]
    assert summary["ours"]["warm_cached_tokens"] == [64] and summary["fallback"]["warm_cached_tokens"] == [0]
    assert summary["ratios"]["ttft_warm_fallback_over_ours"] > 0
    text = bench_hybrid.table(doc)
    assert "| ours |" in text and "| fallback |" in text and "the later ones resume there" in text
