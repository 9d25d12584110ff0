"""LoRA adapters (engine.lora, engine.adapters) on the bundled SmolLM2-135M-Instruct (real
weights): adapters made here, in mlx_lm's format (its own LoRA layers, given random non-zero
weights, saved as `mlx_lm.lora` saves them), scaled so that each changes the greedy tokens.

The reference is mlx_lm alone: the model with `mlx_lm.tuner.utils.load_adapters` (what
`mlx_lm.load(path, adapter_path=...)` does, on our loader's weights, which are float32 on the CPU
fast path like the engine's) and mlx_lm's `generate_step`, greedy. Through the engine: each adapter
in one continuous batch with the base and the other adapters gives mlx_lm's tokens; the prefix
cache never shares a block between adapters; slots are recycled LRU among idle adapters; a
malformed adapter fails only its requests; nothing leaks."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import mlx.core as mx
import pytest
from mlx_lm.tuner.utils import load_adapters

from engine.errors import ModelLoadError
from engine.loading.loader import load_model
from engine.lora import LoRATable, read_adapter

from ..conftest import SMOLLM
from ..lora_adapters import fresh_model, make_adapter, make_malformed_adapter, smollm

PROMPT = [1, 504, 3575, 282, 4649, 314, 7042, 30, 2, 198]


@pytest.fixture(scope="module", autouse=True)
def _one_load():
    """SmolLM2 loads once in this module: the references and the engines each take a copy of its
    model (tests/lora_adapters.fresh_model), into which they put their LoRA layers as into a model
    loaded for them alone; the engines' loads are the loader's own `load_model` otherwise."""
    import engine.engine

    def load(source: str, **options):
        if source != SMOLLM or options.get("fast_cpu") is not None:
            return load_model(source, **options)
        return dataclasses.replace(smollm(), model=fresh_model())

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine.engine, "load_model", load)
        yield


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", seed=1, rank=8)
    make_adapter(root / "b", seed=2, rank=4)
    return root


def reference_logits(path=None) -> mx.array:
    model = fresh_model()
    if path is not None:
        load_adapters(model, str(path))
    return model(mx.array([PROMPT]))[0]


def test_a_mixed_batch_gives_each_row_its_own_adapters_logits(adapters):
    base = fresh_model()
    a, b = read_adapter("a", adapters / "a", base), read_adapter("b", adapters / "b", base)
    table = LoRATable(base, slots=2)
    table.attach(sorted(set(a.weights) | set(b.weights)), rank=8)
    table.put(1, a)
    table.put(2, b)
    table.use([0, 1, 2, 1])
    got = base(mx.array([PROMPT] * 4))
    refs = [reference_logits(), reference_logits(adapters / "a"), reference_logits(adapters / "b")]
    for row, slot in enumerate([0, 1, 2, 1]):
        assert mx.allclose(got[row], refs[slot], atol=1e-3).item(), (row, mx.abs(got[row] - refs[slot]).max())
    assert not mx.allclose(refs[1], refs[0], atol=1e-2).item(), "the adapter changes the logits"
    table.use([0, 0, 0, 0])
    assert table.rows is None
    assert mx.allclose(base(mx.array([PROMPT]))[0], refs[0], atol=1e-4).item()


def test_a_malformed_adapter_is_refused_with_the_reason(adapters, tmp_path):
    base = fresh_model()
    with pytest.raises(ModelLoadError, match="cannot read"):
        read_adapter("missing", tmp_path / "nowhere", base)
    wrong = make_malformed_adapter(tmp_path / "wrong", adapters / "a", "q_proj.lora_b", (8, 7))
    with pytest.raises(ModelLoadError, match=r"q_proj has lora_a .* the base layer needs"):
        read_adapter("wrong", wrong, base)
    mx.save_safetensors(
        str(wrong / "adapters.safetensors"),
        {"model.nope.lora_a": mx.zeros((2, 2)), "model.nope.lora_b": mx.zeros((2, 2))},
    )
    with pytest.raises(ModelLoadError, match="not a linear layer"):
        read_adapter("wrong", wrong, base)
    config = json.loads((adapters / "a" / "adapter_config.json").read_text()) | {"fine_tune_type": "dora"}
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="dora"):
        read_adapter("wrong", wrong, base)


# --- through the engine ---------------------------------------------------------------------

MAX_TOKENS = 6
SYSTEM = list(range(1000, 1040))  # 40 tokens: with block_size 16, two full blocks before the question
QUESTIONS = {"base": [1, 504, 3575, 282, 2], "a": [1, 504, 7042, 30, 2], "b": [1, 4649, 314, 30, 2]}


@pytest.fixture(scope="module")
def three(adapters, tmp_path_factory):
    """Adapters a, b (made above) and c, and two broken ones: wrong shapes, and no files at all."""
    root = tmp_path_factory.mktemp("more")
    make_adapter(root / "c", seed=3, rank=8)
    broken = make_malformed_adapter(root / "broken", adapters / "a", "v_proj.lora_b", (8, 5))
    return {"a": adapters / "a", "b": adapters / "b", "c": root / "c", "broken": broken, "missing": root / "none"}


def generate_alone(prompts: list[list[int]], path=None) -> list[list[int]]:
    """mlx_lm alone, greedy, one prompt at a time: `MAX_TOKENS` tokens of the model (with
    `load_adapters(path)`) for each prompt."""
    from mlx_lm.generate import generate_step

    model = fresh_model()
    if path is not None:
        load_adapters(model, str(path))
    return [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=MAX_TOKENS)] for p in prompts]


@pytest.fixture(scope="module")
def expected(three):
    """mlx_lm's tokens for each (question, adapter) the tests run."""
    prompts = [SYSTEM + ids for ids in QUESTIONS.values()]
    out = {}
    for name in (None, "a", "b", "c"):
        for q, ids in zip(QUESTIONS, generate_alone(prompts, three[name] if name else None)):
            out[q, name] = ids
    return out


def make_engine(three, slots: int, **options):
    from engine.config import EngineConfig
    from engine.engine import AsyncEngine

    adapters = [{"name": name, "path": str(path)} for name, path in three.items()]
    config = EngineConfig(
        cache_memory_mb=64,
        block_size=16,
        prefill_step_size=64,
        prefill_batch_size=4,
        adapters=adapters,
        max_loaded_adapters=slots,
        **options,
    )
    return AsyncEngine.from_source(SMOLLM, config)


@pytest.fixture(scope="module")
def engine(three):
    from engine.compiled_step import CompiledDecode

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompiledDecode, "compile_after", 1)  # every batch shape traced: the compiled LoRA step runs
        eng = make_engine(three, slots=3)
        yield eng
        eng.shutdown()


async def generate(engine, q: str, adapter: str | None):
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = [o async for o in engine.submit(PromptInput(token_ids=SYSTEM + QUESTIONS[q]), params, adapter=adapter)]
    return [t for o in outs for t in o.token_ids], outs[-1].usage


def assert_idle(engine) -> None:
    """Nothing leaked: no request, no sequence holds blocks, no adapter counts a user."""
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["cache"]["live_sequences"] == 0
    assert all(st.users == 0 for st in engine.adapters.states.values())


async def test_each_adapter_in_one_mixed_batch_gives_mlx_lm_s_tokens_alone(engine, expected):
    cases = [("base", None), ("a", "a"), ("b", "b"), ("base", "c"), ("b", None), ("a", "b")]
    got = await asyncio.gather(*(generate(engine, q, name) for q, name in cases))
    for (q, name), (ids, _) in zip(cases, got):
        assert ids == expected[q, name], (q, name)
    for name in "abc":
        assert expected["base", name] != expected["base", None], f"adapter {name} changes the greedy tokens"
    assert engine.stats()["batch_peak"] >= 4, "the rows ran in one batch"
    assert any(shape[-1] == "lora" for shape in engine.scheduler.gen.compiled.shapes), "the compiled LoRA step ran"
    assert_idle(engine)


async def test_the_prefix_cache_never_shares_blocks_between_adapters(engine, expected):
    engine.clear_cache()
    ids, usage = await generate(engine, "base", "a")
    assert ids == expected["base", "a"] and usage.cached_tokens == 0
    ids, usage = await generate(engine, "base", "b")  # the same prompt under another adapter
    assert ids == expected["base", "b"] and usage.cached_tokens == 0
    ids, usage = await generate(engine, "base", None)  # and under the base
    assert ids == expected["base", None] and usage.cached_tokens == 0
    ids, usage = await generate(engine, "a", "a")  # the same system prompt under a again: shared
    assert ids == expected["a", "a"] and usage.cached_tokens >= len(SYSTEM)
    ids, usage = await generate(engine, "base", "a")  # the whole prompt again
    assert ids == expected["base", "a"] and usage.cached_tokens == len(SYSTEM + QUESTIONS["base"]) - 1
    assert_idle(engine)


async def test_a_malformed_adapter_fails_only_its_requests(engine, expected):
    from engine.errors import AdapterLoadError, UnknownAdapterError

    states = engine.adapter_states()
    assert states["missing"]["state"] == "failed" and "cannot read" in states["missing"]["error"]
    with pytest.raises(UnknownAdapterError) as unknown:
        await generate(engine, "base", "nope")
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    cases = [("base", "broken"), ("a", "a"), ("base", "missing"), ("b", None)]
    got = await asyncio.gather(*(generate(engine, q, name) for q, name in cases), return_exceptions=True)
    for name in ("broken", "missing"):
        error = got[[n for _, n in cases].index(name)]
        assert isinstance(error, AdapterLoadError) and error.status_code == 422 and repr(name) in error.message
    assert "v_proj has lora_a" in got[0].message
    assert got[1][0] == expected["a", "a"] and got[3][0] == expected["b", None]
    assert engine.adapter_states()["broken"]["state"] == "failed"
    assert_idle(engine)


async def test_three_adapters_share_two_slots_and_a_busy_one_is_never_evicted(three, expected):
    """With speculation on: verify steps run adapter rows under their adapters (exact outputs)."""
    engine = make_engine(three, slots=2, speculative={"method": "ngram", "ngram_min": 1, "num_draft_tokens": 2})
    try:
        cases = [(q, name) for name in "abc" for q in ("base", "a")] + [("b", None)]
        got = await asyncio.gather(*(generate(engine, q, name) for q, name in cases))
        for (q, name), (ids, _) in zip(cases, got):
            assert ids == expected[q, name], (q, name)
        stats = engine.stats()["adapters"]
        assert stats["slots_used"] == 2 and stats["slots_total"] == 2
        states = engine.adapter_states()
        assert sorted(states[n]["state"] for n in "abc") == ["loaded", "loaded", "unloaded"]
        assert all(states[n]["requests"] == 2 for n in "abc")
        assert engine.stats()["speculative"]["verify_steps"] > 0
        assert_idle(engine)
        unloaded = next(n for n in "abc" if states[n]["state"] == "unloaded")
        await asyncio.to_thread(engine.load_adapter, unloaded)  # the operator's load evicts the LRU idle one
        assert engine.adapter_states()[unloaded]["state"] == "loaded"
        await asyncio.to_thread(engine.unload_adapter, unloaded)
        assert engine.adapter_states()[unloaded]["state"] == "unloaded"
    finally:
        engine.shutdown()


def test_adapter_names_must_be_unique():
    from pydantic import ValidationError

    from engine.config import EngineConfig

    assert EngineConfig().adapters == [] and EngineConfig().max_loaded_adapters == 4
    with pytest.raises(ValidationError, match="adapter names must be unique; repeated: a"):
        EngineConfig(adapters=[{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}, {"name": "b", "path": "/z"}])
    with pytest.raises(ValidationError, match="max_loaded_adapters"):
        EngineConfig(max_loaded_adapters=0)
