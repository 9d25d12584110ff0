"""Speculative decoding in the batch (engine.speculative), on the bundled SmolLM2-135M-Instruct
(real weights, float32 on the CPU): with prompt-lookup drafts, or a draft model (SmolLM2 itself,
or SmolLM2 with seeded noise on its weights so that drafts are partly wrong), every request
decodes exactly as without them — greedy, seeded sampling, logprobs, penalties, stop strings, max_tokens — alone
or in a batch with rows that do not draft, and the K/V it leaves in the prefix cache are those
of the tokens it kept. (tests/engine/test_families.py checks the verify step on every family's
random-weight model.)"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import EngineConfig, SpeculativeConfig
from engine.engine import AsyncEngine
from engine.request import PromptInput
from engine.speculative import EXPLORE, PAUSE_MIN, PIPELINED_MARGIN, NgramIndex, RowSpec, Speculator, StepCosts, kept

from ..conftest import SMOLLM
from .helpers import chat, run

PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Alice met Bob at the market on Tuesday, and they "
    "bought three apples, two pears and a melon for the picnic by the river."
)
EDIT = chat("Repeat this text exactly, word for word:\n" + PASSAGE)
OPEN = chat("Write a short poem about the sea.")
CONFIG = EngineConfig(cache_memory_mb=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def off(load_once):
    eng = AsyncEngine.from_source(SMOLLM, CONFIG)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module", params=["unpipelined", "pipelined"])
def engines(off, request):
    """Without speculation, and with prompt lookup: in the CPU's unpipelined loop, and in the
    pipelined one a GPU runs (it reads its step in flight first whenever a row would draft)."""
    pipelined = request.param == "pipelined"
    update = {"speculative": SpeculativeConfig(method="ngram"), "pipelined_decode": pipelined}
    on = AsyncEngine.from_source(SMOLLM, CONFIG.model_copy(update=update))
    assert on.scheduler.gen.pipelined is pipelined
    assert on.scheduler.gen.spec.costs.margin == (PIPELINED_MARGIN if pipelined else 1.0)
    yield off, on
    on.shutdown()


def brute_lookup(tokens: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Prompt lookup by a scan of the row: what followed the latest earlier occurrence of its last
    n tokens, the longest n that occurred."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        suffix = tokens[len(tokens) - n :]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def lookup(tokens: list[int], n_min: int, n_max: int, k: int, split: int | None = None) -> list[int]:
    """The row's index built as the loop builds it: the prompt, then tokens arriving."""
    index = NgramIndex(n_min, n_max)
    row = list(tokens[:split])
    index.add(row, 0)
    for t in tokens[len(row) :]:
        row.append(t)
        index.add(row, len(row) - 1)
    return index.lookup(row, k)


def test_prompt_lookup_takes_what_followed_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup(tokens, 2, 3, 2) == [7, 8]  # the latest "1 2 3", not the first
    assert lookup(tokens, 2, 3, 10, split=5) == [7, 8, 5, 1, 2, 3]  # up to the end
    assert lookup([4, 5, 6, 1, 2], 2, 3, 4) == []  # the suffix never occurred
    assert lookup([5, 6, 5, 6, 9, 5, 6], 2, 2, 1) == [9]
    assert lookup([3], 1, 4, 4) == []
    rng = np.random.default_rng(0)
    for _ in range(300):
        row = rng.integers(0, 4, int(rng.integers(1, 40))).tolist()
        n_min = int(rng.integers(1, 4))
        n_max = n_min + int(rng.integers(0, 3))
        split = int(rng.integers(0, len(row) + 1))
        assert lookup(row, n_min, n_max, 4, split) == brute_lookup(row, n_min, n_max, 4), (row, n_min, n_max)


def test_a_row_pauses_when_its_drafts_are_rejected_and_longer_each_time():
    spec = RowSpec([1, 2, 3], floor=0.3)
    spec.judge(4, 0)
    spec.judge(4, 0)
    assert spec.pause == PAUSE_MIN
    spec.pause = 0
    spec.judge(4, 0)
    spec.judge(4, 0)
    assert spec.pause == 2 * PAUSE_MIN
    # a pipelined loop asks first whether a row would draft (no pause runs down) and the cost rule
    # would take the step, then ticks
    speculator = Speculator(SpeculativeConfig(method="ngram"))
    speculator.costs.observe_plain(2, 0.010)
    speculator.costs.observe_verify(2, 4, 0.011)  # pays: 2 rows x 4 wide for about a plain step
    rows = [speculator.start([1, 2, 3, 1, 2]), speculator.start([4, 5, 6])]
    assert speculator.may_verify(rows, [4, 4]) and not speculator.may_verify(rows, [0, 4])
    rows[0].pause = 2
    assert not speculator.may_verify(rows, [4, 4]) and rows[0].pause == 2
    speculator.tick(rows)
    speculator.tick(rows)
    assert speculator.may_verify(rows, [4, 4]) and rows[1].pause == 0
    # where such a step does not pay, the loop keeps its step in flight (every EXPLORE-th is taken)
    speculator.costs.verify[2, 4] = 0.050
    taken = [speculator.may_verify(rows, [4, 4]) for _ in range(EXPLORE)]
    assert taken == [False] * (EXPLORE - 1) + [True]
    assert kept([5, 6, 7], [5, 6, 8, 9]) == 2 and kept([5], [4, 1]) == 0 and kept([], [3]) == 0


def test_a_verify_step_is_taken_when_it_should_pay_for_the_batch_and_slow_no_row_much():
    costs = StepCosts()
    costs.observe_plain(2, 0.010)  # a plain step of 2 rows: 100 tokens/s each
    costs.observe_plain(4, 0.014)
    assert costs.predict(3) == pytest.approx(0.012)  # between the two measured sizes
    costs.observe_verify(2, 5, 0.020)  # 2 rows x 5 wide (a CPU: the width costs compute)
    assert costs.worth([1.5, 1.5], 5)  # each row: 2.5 tokens in 20 ms
    assert not costs.worth([3.0, 0.0], 5), "the batch gains, but the row without drafts halves its rate"
    gpu = StepCosts({2: 0.010}, {(2, 5): 0.0105})  # a GPU-like width: nearly free
    assert gpu.worth([3.0, 0.0], 5)
    for _ in range(EXPLORE - 2):
        assert not costs.worth([0.5, 0.0], 5)
    assert costs.worth([0.5, 0.0], 5), "now and then it measures again"


def test_a_verify_step_is_judged_by_verify_steps_not_by_plain_steps_computing_as_many_tokens():
    """A GPU: a plain step of 1 to 5 rows costs about 10 ms, a verify step (the prompt-chunk path)
    of 1 row x 5 tokens 30 ms, of 5 rows x 5 tokens 35 ms. Keyed by the tokens a step computes,
    the plain step of 5 rows and the verify step of 1 x 5 would share one estimate (and the
    plain step of 5 rows would stand for a verify step of 5 tokens measured never)."""
    costs = StepCosts()
    costs.observe_verify(1, 5, 0.030)
    costs.observe_verify(5, 5, 0.035)
    for rows in (1, 2, 3, 4, 5, 5, 5):
        costs.observe_plain(rows, 0.010)
    assert costs.verify[(1, 5)] == pytest.approx(0.030) and costs.predict(5) == pytest.approx(0.010)
    assert not costs.worth([1.5], 5), "2.5 tokens in 30 ms against 1 in 10 ms"
    assert not costs.worth([1.5] * 5, 5)
    assert costs.worth([3.5] * 5, 5), "4.5 tokens a row in 35 ms beats 1 in 10 ms"
    assert costs.predict(6) is None, "a plain step is never guessed from verify steps"


def test_a_shape_never_measured_is_measured_first_unless_a_smaller_one_already_does_not_pay():
    costs = StepCosts()
    assert not costs.worth([3.0], 5), "no plain step measured: a plain step first, what verifying must beat"
    assert costs.refused == 0
    costs.observe_plain(1, 0.010)
    costs.observe_plain(2, 0.012)
    assert costs.worth([1.0], 5), "a verify shape never measured is taken, to measure it"
    costs.observe_verify(1, 3, 0.045)  # 1 row x 3 wide: 2 tokens in 45 ms, against 1 in 10 ms
    assert not costs.worth([1.0], 3)
    assert not costs.worth([3.0], 5), "1 x 5 costs no less than 1 x 3: 4 tokens in >= 45 ms do not pay"
    assert not costs.worth([2.0, 2.0], 5), "nor 2 x 5: 6 tokens in >= 45 ms, against 2 in 12 ms"
    assert not costs.worth([1.0], 2), "1 x 2, never measured, guessed at the cheapest measured: 45 ms"
    costs.observe_verify(1, 2, 0.011)
    assert costs.worth([1.0], 2)
    assert costs.worth([3.0, 3.0], 5), "2 x 5 at 45 ms or more: 8 tokens might pay, so it is measured"


def test_a_pipelined_loop_takes_a_verify_step_only_with_a_margin_over_a_plain_one():
    """At par a verify step of 2.2 tokens a row in 20 ms beats a plain step's 1 in 10 ms (1.1x);
    a pipelined loop (a GPU), whose verify steps also stop the host/device overlap, wants 1.25x."""
    par = StepCosts({2: 0.010}, {(2, 5): 0.020})
    gpu = StepCosts({2: 0.010}, {(2, 5): 0.020}, margin=PIPELINED_MARGIN)
    assert par.worth([1.2, 1.2], 5) and not gpu.worth([1.2, 1.2], 5)
    assert gpu.worth([2.0, 2.0], 5), "3 tokens a row in 20 ms: 1.5x"


def test_a_shape_with_no_smaller_one_measured_is_guessed_from_the_cheapest_measured():
    """A GPU: a verify step costs ~30 ms at every small shape, a plain step 5 ms. Measured once at
    5 x 5, the shapes below it are not each taken to be measured (20 shapes for 5 rows, each a
    loss), only every EXPLORE-th refused step."""
    costs = StepCosts({r: 0.005 for r in range(1, 6)})
    assert costs.guess() is None and costs.worth([3.0] * 5, 5), "no verify step measured: measured"
    costs.observe_verify(5, 5, 0.030)
    shapes = [(rows, width) for rows in range(1, 6) for width in range(2, 6) if (rows, width) != (5, 5)]
    taken = [costs.worth([1.0] * rows, width) for rows, width in shapes]
    assert not any(taken) and costs.refused == len(shapes)
    assert not costs.worth([4.0] * 5, 5), "measured: 25 tokens in 30 ms against 5 in 5 ms"
    costs.refused = EXPLORE - 1
    assert costs.worth([1.0], 2), "the EXPLORE-th refusal measures again"
    cpu = StepCosts({1: 0.010}, {(1, 5): 0.030})  # a CPU: 5 tokens cost 30 ms, 2 would cost ~12
    assert cpu.worth([4.0], 5) and not cpu.worth([1.0], 2), "a smaller shape overpriced until measured"


async def test_greedy_editing_decodes_the_same_in_fewer_steps(engines):
    off, on = engines
    before = on.stats().get("speculative") or {}
    text_off, ids_off, _ = await run(off, EDIT, max_tokens=32, temperature=0)
    text_on, ids_on, outs = await run(on, EDIT, max_tokens=32, temperature=0)
    assert ids_on == ids_off and text_on == text_off
    assert PASSAGE[:30] in text_on, "the model repeats the passage (the workload drafting pays on)"
    spec = on.stats()["speculative"]
    assert spec["method"] == "ngram"
    assert spec["accepted_tokens"] > before.get("accepted_tokens", 0)
    assert spec["tokens_per_step"] > 2
    costs = on.scheduler.gen.spec.costs  # each kind of step measured apart: a verify step is >= 2 wide
    assert costs.plain and costs.verify and all(width >= 2 for _, width in costs.verify)


async def test_a_rule_that_refuses_every_verify_step_still_takes_every_explore_th(engines, monkeypatch):
    """Measured costs go stale unless a refused verify step is taken now and then (EXPLORE). The
    pipelined loop asks the rule before it reads ahead; asked again after the read, it would refuse
    the very step it took, and a refusing rule would never measure again."""
    import engine.speculative as speculative

    _, on = engines
    spec = on.scheduler.gen.spec
    saved = dict(spec.costs.plain), dict(spec.costs.verify), spec.costs.refused
    monkeypatch.setattr(speculative, "EXPLORE", 2)
    spec.costs.plain[1] = 0.001  # a lone row: its plain step cheap, every verify step dear
    for width in range(2, spec.config.num_draft_tokens + 2):
        spec.costs.verify[1, width] = 10.0
    before = on.stats().get("speculative", {}).get("verify_steps", 0)
    try:
        await run(on, EDIT, max_tokens=24, temperature=0)
        assert on.stats()["speculative"]["verify_steps"] > before
    finally:
        spec.costs.plain, spec.costs.verify, spec.costs.refused = saved


async def test_a_mixed_batch_decodes_each_row_as_without_speculation(engines):
    """Rows that draft (editing), rows that mostly do not (open-ended), seeded sampling, logprobs,
    a penalty row (its batch verifies nothing while it runs) and a stop string, all at once, each
    as the same batch decodes without speculation (which is as each decodes alone: test_engine)."""
    off, on = engines
    cases = [
        (EDIT, dict(max_tokens=24, temperature=0)),
        (OPEN, dict(max_tokens=16, temperature=0)),
        (EDIT, dict(max_tokens=20, temperature=0.8, seed=7)),
        (OPEN, dict(max_tokens=12, temperature=0.7, top_p=0.9, seed=3)),
        (EDIT, dict(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)),
        (EDIT, dict(max_tokens=40, temperature=0, stop=["melon"])),
    ]
    alone = await asyncio.gather(*(run(off, p, **kw) for p, kw in cases))
    together = await asyncio.gather(*(run(on, p, **kw) for p, kw in cases))
    for (_, kw), (text_a, ids_a, outs_a), (text_b, ids_b, outs_b) in zip(cases, alone, together):
        assert ids_b == ids_a and text_b == text_a, kw
        assert outs_b[-1].finish_reason == outs_a[-1].finish_reason, kw
        if kw.get("logprobs"):
            lp_a = [e for o in outs_a for e in o.logprobs or ()]
            lp_b = [e for o in outs_b for e in o.logprobs or ()]
            assert [e["id"] for e in lp_b] == [e["id"] for e in lp_a]
            assert [t[0] for e in lp_b for t in e["top"]] == [t[0] for e in lp_a for t in e["top"]]
            assert np.allclose([e["logprob"] for e in lp_b], [e["logprob"] for e in lp_a], atol=1e-3)
    assert "melon" not in together[-1][0] and together[-1][2][-1].finish_reason == "stop"
    penalty = dict(max_tokens=8, temperature=0, repetition_penalty=1.3)
    assert (await run(on, EDIT, **penalty))[1] == (await run(off, EDIT, **penalty))[1]


async def test_max_tokens_is_exact_when_drafts_would_run_past_it(engines):
    off, on = engines
    for n in (1, 2, 5, 7):
        _, ids_on, outs = await run(on, EDIT, max_tokens=n, temperature=0)
        _, ids_off, _ = await run(off, EDIT, max_tokens=n, temperature=0)
        assert ids_on == ids_off and len(ids_on) == n and outs[-1].finish_reason == "length"


async def test_the_prefix_cache_holds_the_kept_tokens_k_v(engines):
    """A follow-up turn reuses the blocks the speculating request wrote (its prompt and answer):
    it decodes as the engine without speculation does, so no rejected draft's K/V was kept."""
    off, on = engines
    on.clear_cache()
    first, _, _ = await run(on, EDIT, max_tokens=40, temperature=0)
    follow = PromptInput(
        messages=[*EDIT.messages, {"role": "assistant", "content": first}, {"role": "user", "content": "Again."}]
    )
    _, ids_on, outs = await run(on, follow, max_tokens=24, temperature=0)
    _, ids_off, _ = await run(off, follow, max_tokens=24, temperature=0)
    assert ids_on == ids_off
    assert outs[-1].usage.cached_tokens > len(on.prepare_prompt(EDIT)[0])


async def test_no_block_is_leaked(engines):
    _, on = engines
    await asyncio.gather(*(run(on, EDIT, max_tokens=12 + i, temperature=0) for i in range(4)))
    cache = on.stats()["cache"]
    assert cache["live_sequences"] == 0


def perturbed(loaded, scale: float):
    """The same model with seeded multiplicative noise on every weight: a draft model that shares
    the tokenizer and mostly, not always, agrees with it."""
    import dataclasses

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from engine.loading.loader import load_model

    copy = load_model(SMOLLM)
    mx.random.seed(0)
    weights = [(k, v * (1 + scale * mx.random.normal(v.shape))) for k, v in tree_flatten(copy.model.parameters())]
    copy.model.update(tree_unflatten(weights))
    mx.eval(copy.model.parameters())
    return dataclasses.replace(copy, source=loaded.source)


@pytest.fixture(scope="module")
def drafted(load_once, monkeypatch_module):
    """An engine speculating with a draft model: SmolLM2 with seeded noise on its weights (drafts
    mostly right, partly wrong: rejections cut both caches back). At 0.05 about half the drafted
    tokens are kept; at 0.15 it was 3%, so whether any was kept hung on one or two steps."""
    import engine.engine

    shared = engine.engine.load_model
    noisy = perturbed(shared(SMOLLM), 0.05)
    monkeypatch_module.setattr(engine.engine, "load_model", lambda s, **kw: noisy if s == "noisy" else shared(s, **kw))
    config = CONFIG.model_copy(update={"speculative": SpeculativeConfig(method="draft", draft_model="noisy")})
    eng = AsyncEngine.from_source(SMOLLM, config)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


async def test_a_draft_model_batch_decodes_each_row_as_without_speculation(off, drafted):
    cases = [
        (EDIT, dict(max_tokens=20, temperature=0)),
        (OPEN, dict(max_tokens=16, temperature=0)),
        (OPEN, dict(max_tokens=12, temperature=0.8, seed=11)),
        (EDIT, dict(max_tokens=8, temperature=0, logprobs=True, top_logprobs=1)),
    ]
    alone = await asyncio.gather(*(run(off, p, **kw) for p, kw in cases))
    for _ in range(2):  # the second time, both the target's and the draft's prefix caches hit
        together = await asyncio.gather(*(run(drafted, p, **kw) for p, kw in cases))
        for (_, kw), a, b in zip(cases, alone, together):
            assert b[1] == a[1], kw
    spec = drafted.stats()["speculative"]
    assert spec["method"] == "draft" and spec["draft_model"] == "noisy"
    assert 0 < spec["accepted_tokens"] < spec["drafted_tokens"], spec
    assert drafted.footprint.weights >= 2 * off.footprint.weights * 0.99, "the draft's weights are counted"
    assert drafted.footprint.kv > off.footprint.kv


def test_a_draft_model_with_another_tokenizer_is_refused(load_once):
    from engine.errors import ModelLoadError

    config = CONFIG.model_copy(update={"speculative": SpeculativeConfig(method="draft", draft_model="synthetic:llama")})
    with pytest.raises(ModelLoadError, match="does not share the tokenizer"):
        AsyncEngine.from_source(SMOLLM, config)
