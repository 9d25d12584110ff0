"""bench_embeddings' pure parts: the inputs it sends, the server it starts, its table."""

from __future__ import annotations

import importlib.util
import statistics
import zipfile
from pathlib import Path

from benchmarks import bench_embeddings
from deployments.config import validate_args


def tokens(texts: list[str]) -> list[int]:
    from tokenizers import Tokenizer

    zipped = Path(importlib.util.find_spec("all_minilm_l6_v2").origin).parent / "model.zip"
    with zipfile.ZipFile(zipped) as zf:
        tokenizer = Tokenizer.from_str(zf.read("tokenizer.json").decode())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return [len(e.ids) for e in tokenizer.encode_batch(texts)]


def test_short_inputs_are_about_10_tokens_and_long_ones_about_200_all_different():
    texts = bench_embeddings.texts_by_size(["short", "long"], [1, 16, 64])
    assert len(set(texts["short"])) == len(texts["short"]) == 256
    assert len(set(texts["long"])) == len(texts["long"])
    assert 8 <= statistics.mean(tokens(texts["short"])) <= 14
    assert 170 <= statistics.mean(tokens(texts["long"])) <= 240 and max(tokens(texts["long"])) <= 256


def test_the_server_hosts_the_model_batched_and_unbatched_as_a_valid_config():
    config = bench_embeddings.serve_config(max_batch_size=32, threads=2)
    args = validate_args(config["applications"][0]["args"])
    batching = {m.name: m.embedding.max_batch_size for m in args.models}
    assert batching == {"minilm-batched": 32, "minilm-unbatched": 1}
    assert all(m.kind == "embedding" and m.deployment.env_vars["OPENBLAS_NUM_THREADS"] == "2" for m in args.models)


def test_the_table_has_a_row_per_size_and_clients_with_both_ratios():
    cells = [
        {"mode": "http-batched", "size": "long", "clients": 16, "embeddings_per_s": 300.0},
        {"mode": "http-unbatched", "size": "long", "clients": 16, "embeddings_per_s": 100.0},
        {"mode": "engine", "size": "long", "clients": 16, "embeddings_per_s": 400.0},
        {"mode": "sentence-transformers", "size": "long", "clients": 16, "embeddings_per_s": 200.0},
        {"mode": "engine", "size": "short", "clients": 1, "embeddings_per_s": 50.0},
    ]
    lines = bench_embeddings.table(cells).splitlines()
    assert lines[2].startswith("| short | 1 | n/a | n/a | 50.00 | n/a |")
    assert lines[3] == "| long | 16 | 300 | 100 | 400 | 200 | 3.00 | 2.00 |"
