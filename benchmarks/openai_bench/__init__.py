"""Benchmarks any OpenAI-compatible server over HTTP and reproduces the seed's tables.

    python -m benchmarks openai --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct
    python -m benchmarks openai --target ours=http://127.0.0.1:8000 smollm2-135m-instruct \\
        --target mlx_lm=http://127.0.0.1:8081 smollm2-135m-instruct=/path/to/mlx-dir

Scenarios (all streamed, temperature 0, `ignore_eos` where the server accepts it):
  batching   one request alone vs 5 concurrent, per model: aggregate tok/s and the speedup
  streaming  TTFT and generation tok/s of single streamed requests
  prefix     the prefix-cache table (MISS, HIT, MISS, HIT, PREFIX_HIT), from the server's
             GET /v1/models/{model}/cache counters (and usage.prompt_tokens_details.cached_tokens)
  paged      10 concurrent users sharing a ~500-token system prompt: KV blocks and bytes at peak
  sweep      concurrency levels: aggregate tok/s, p50/p99 TTFT, inter-token latency and TPOT

Outputs: LABEL.json, LABEL.md, LABEL_sweep_{tok_s,ttft,itl}.png under --out-dir. Errors are
counted per kind and listed, never retried. `--merge A.json B.json` renders earlier runs as one
report; `--cpu-profile` adds the cores each local process used during each scenario.

Modules: prompts, scenarios, tables (markdown, PNG plots), cpu (process sampler), runner (targets
x models x scenarios, progress bar, time budget); the HTTP client and the statistics are
benchmarks/client.py and benchmarks/metrics.py, shared with the other suites.
"""
