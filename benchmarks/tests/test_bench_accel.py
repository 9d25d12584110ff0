"""bench_accel's pure parts: prompts, the comparisons and goals, the table, py-spy summaries."""

from benchmarks import accel_profile, accel_servers, bench_accel


def row(target, clients, tok_s, ttft, errors=0):
    return {
        "target": target,
        "clients": clients,
        "tok_s": tok_s,
        "tok_s_rounds": [tok_s],
        "ttft_p50_ms": ttft,
        "ttft_p99_ms": ttft * 2,
        "errors": errors,
        "tokens_per_request": 128.0,
    }


def test_prompts_are_short_and_unique():
    a, b = bench_accel.prompt_text("r0w0c1"), bench_accel.prompt_text("r0w0c2")
    assert a != b and len(a) == len(b) == 32


def test_compare_and_goals():
    rows = [
        row("engine", 1, 200.0, 20.0),
        row("serve run", 1, 194.0, 30.0),
        row("mlx_lm.server", 1, 180.0, 40.0),
        row("engine", 64, 4000.0, 100.0),
        row("serve run", 64, 3600.0, 130.0),
        row("mlx_lm.server", 64, 3700.0, 120.0),
    ]
    c = bench_accel.compare(rows, [1, 64])
    assert c["1"]["serve_over_engine"] == 0.97 and c["1"]["serve_added_ttft_p50_ms"] == 10.0
    assert c["1"]["best_peer"] == "mlx_lm.server" and c["1"]["serve_ahead_of_every_peer"]
    assert not c["64"]["serve_ahead_of_every_peer"]
    g = bench_accel.goals(c)
    assert g["1"] == {"serve_ge_95pct_engine": True, "added_ttft_p50_le_15ms": True, "ahead_of_both_peers": True}
    assert g["64"] == {"serve_ge_95pct_engine": False, "added_ttft_p50_le_15ms": False, "ahead_of_both_peers": False}


def test_table_names_a_server_that_did_not_serve():
    rows = [row("engine", 1, 200.0, 20.0), row("serve run", 1, 190.0, 25.0)]
    doc = {"rows": rows, "compare": bench_accel.compare(rows, [1]), "servers": {"vllm-mlx": {"error": "boom"}}}
    text = bench_accel.table(doc)
    assert "| 1 | serve run |" in text and "vllm-mlx did not serve: boom" in text


def test_serve_yaml_is_a_valid_config(tmp_path):
    from deployments.config import check_serve_config

    path = accel_servers.write_yaml(str(tmp_path), 64, tmp_path)
    model = check_serve_config(str(path))[0].models[0]
    assert model.engine.max_num_seqs == 64 and model.allow_ignore_eos and model.name == accel_servers.MODEL_NAME


def test_py_spy_summary():
    raw = "MainThread;run (a/b/loop.py:10);step (engine/x.py:5) 30\nMainThread;run (a/b/loop.py:11) 10\n"
    s = accel_profile.summarize(raw)
    assert s["samples"] == 40
    assert s["self"][0] == ["step (x.py)", 0.75]
    assert ["run (loop.py)", 1.0] in s["inclusive"]


class FakeTarget(bench_accel.Target):
    """Answers at once: `tokens` tokens, the first after 1 ms."""

    def __init__(self, label, tokens=8):
        super().__init__(label)
        self.tokens = tokens

    async def one(self, prompt, max_tokens, where=None):
        import asyncio

        await asyncio.sleep(0.001)
        return bench_accel.RequestResult(ok=True, ttft=0.001, latency=0.002, completion_tokens=self.tokens)


async def test_rounds_rows_and_table_with_fake_targets(monkeypatch):
    """The rounds, rows and table, with targets that answer at once. The serve target's process
    scan is stubbed: on a machine where another `serve run` lives (the e2e tests beside this one)
    it would find that one's processes."""
    import argparse

    monkeypatch.setattr(bench_accel, "serve_procs", lambda target: {})

    args = argparse.Namespace(clients=[1, 4], max_tokens=8, waves=2, rounds=2, budget_s=60, out=None)
    doc = {"servers": {}}
    run = await bench_accel.measure(args, doc, [FakeTarget("engine"), FakeTarget("serve run", tokens=8)])
    assert doc["rounds_done"] == 2 and not doc["skipped_for_time"]
    by = {(r["target"], r["clients"]): r for r in doc["rows"]}
    assert by[("serve run", 4)]["requests"] == 16 and by[("serve run", 4)]["errors"] == 0
    assert len(by[("engine", 1)]["tok_s_rounds"]) == 2
    assert set(doc["compare"]) == {"1", "4"} and run.serve_cpu == {}
    assert "| 4 | engine |" in bench_accel.table(doc)
