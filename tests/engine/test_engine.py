"""The continuous-batching engine on the real SmolLM2 model (CPU, short prompts, few tokens)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.engine import AsyncEngine
from engine.errors import InvalidRequestError
from engine.request import PromptInput
from engine.sampling import SamplingParams

from ..conftest import SMOLLM
from .helpers import chat, collect, run

# Short questions SmolLM2 answers in a few tokens.
QUESTIONS = ["What is 2+2?", "Name 3 colors.", "What is Python?", "Capital of Japan?", "Who wrote Hamlet?"]


@pytest.fixture(scope="module", autouse=True)
def _one_load_per_model(load_once):
    """Every engine of this module shares its model's weights (tests/conftest.load_once)."""


async def test_batched_greedy_equals_solo_with_late_insert(engine):
    solo = [(await run(engine, chat(q), temperature=0, max_tokens=12))[1] for q in QUESTIONS]
    first = [engine.submit(chat(q), SamplingParams(temperature=0, max_tokens=12)) for q in QUESTIONS[:4]]
    heads = [await s.__anext__() for s in first]  # all four are decoding now
    late = engine.submit(chat(QUESTIONS[4]), SamplingParams(temperature=0, max_tokens=12))
    rests = await asyncio.gather(*(collect(s) for s in [*first, late]))
    batched = [h.token_ids + r[1] for h, r in zip(heads, rests[:4])] + [rests[4][1]]
    assert batched == solo


async def test_seed_reproducible_inside_a_batch(engine):
    params = dict(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=12)
    alone = (await run(engine, chat("Tell me a story."), **params))[1]
    noise = [engine.submit(chat(q), SamplingParams(temperature=1.0, max_tokens=12)) for q in QUESTIONS[:3]]
    again, *_ = await asyncio.gather(run(engine, chat("Tell me a story."), **params), *(collect(s) for s in noise))
    assert again[1] == alone


async def test_stop_string_is_not_returned_and_the_one_that_matched_is_named(engine):
    text, _, outs = await run(
        engine, chat("Count from 1 to 10, separated by commas."), temperature=0, max_tokens=40, stop=["9", "5"]
    )
    unstopped, _, _ = await run(engine, chat("Count from 1 to 10, separated by commas."), temperature=0, max_tokens=40)
    assert "5" in unstopped
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_sequence == "5"
    assert "5" not in text and unstopped.startswith(text)
    assert (await run(engine, chat("Hi"), temperature=0, max_tokens=3))[2][-1].stop_sequence is None


async def test_max_tokens_gives_length(engine):
    _, ids, outs = await run(engine, chat("Write a long essay about the sea."), temperature=0, max_tokens=7)
    assert outs[-1].finish_reason == "length"
    assert len(ids) == 7 and outs[-1].usage.completion_tokens == 7
    assert outs[-1].usage.prompt_tokens > 10


async def test_abort_mid_stream_frees_everything(engine):
    stream = engine.submit(chat("Write a long essay about the sea."), SamplingParams(temperature=0, max_tokens=200))
    await stream.__anext__()
    await stream.aclose()
    for _ in range(100):
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_cache_bytes"] == 0
    assert stats["aborted"] >= 1
    _, ids, _ = await run(engine, chat("What is 2+2?"), temperature=0, max_tokens=4)  # still serving
    assert len(ids) > 0


async def test_a_slow_reader_gets_merged_deltas_not_a_growing_queue(engine):
    params = dict(temperature=0, max_tokens=12, ignore_eos=True)
    text, ids, _ = await run(engine, chat("Write a long essay about the sea."), **params)
    stream = engine.submit(chat("Write a long essay about the sea."), SamplingParams(**params))
    for _ in range(200):  # read nothing until the request has finished
        await asyncio.sleep(0.05)
        if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
            break
    outs = [o async for o in stream]
    assert len(outs) == 1 and outs[0].finish_reason == "length"
    assert outs[0].token_ids == ids and outs[0].text == text


async def test_bad_input_is_rejected_and_engine_keeps_serving(engine):
    bad_params = [{"max_tokens": 0}, {"temperature": -0.5}, {"top_p": 0.0}, {"top_p": 1.5}, {"bogus": 1}]
    for values in bad_params:
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams.parse(values)
        assert info.value.param == next(iter(values))
    with pytest.raises(InvalidRequestError, match="context"):
        engine.submit(PromptInput(token_ids=[1] * (engine.context_length + 5)), SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.submit(PromptInput(messages=[]), SamplingParams())
    with pytest.raises(InvalidRequestError):
        engine.submit(PromptInput(token_ids=[10**9]), SamplingParams())
    _, ids, _ = await run(engine, chat("What is 2+2?"), temperature=0, max_tokens=4)
    assert len(ids) == 4 or len(ids) > 0


async def test_stream_interval_chunks():
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(stream_interval=4, paged_cache=False))
    try:
        _, ids, outs = await run(eng, chat("Write a long essay about the sea."), temperature=0, max_tokens=10)
    finally:
        eng.shutdown()
    assert [len(o.token_ids) for o in outs] == [4, 4, 2]
    assert len(ids) == 10


async def test_simple_mode_queues_in_fifo_order():
    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(continuous_batching=False, paged_cache=False))
    try:
        order: list[int] = []

        async def one(i):
            _, ids, _ = await run(eng, chat(QUESTIONS[i]), temperature=0, max_tokens=6)
            order.append(i)
            return ids

        tasks = [asyncio.create_task(one(i)) for i in range(3)]
        await asyncio.sleep(0.3)
        waiting = eng.stats()["waiting"]
        results = await asyncio.gather(*tasks)
        solo = [(await run(eng, chat(QUESTIONS[i]), temperature=0, max_tokens=6))[1] for i in range(3)]
    finally:
        eng.shutdown()
    assert waiting >= 1  # the others waited instead of being rejected
    assert order == [0, 1, 2]
    assert results == solo


def test_config_chat_template_lets_a_base_model_chat(smollm):
    from engine.prompts import encode_prompt

    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    ids = encode_prompt(smollm.tokenizer, chat("hi"), template)
    assert smollm.tokenizer.decode(ids) == f"{smollm.tokenizer.bos_token}[user] hi\n[assistant] "


def test_a_models_stop_tokens_and_strings_are_joined_not_replaced_by_a_request():
    from engine.sampling import with_defaults

    defaults = {"stop_token_ids": [106], "stop": ["<end_of_turn>"], "temperature": 1.0}
    merged = with_defaults(defaults, {"stop_token_ids": [7, 106], "stop": "END", "temperature": 0})
    assert merged == {"stop_token_ids": [106, 7], "stop": ["<end_of_turn>", "END"], "temperature": 0}
    assert with_defaults(defaults, {}) == defaults


async def test_a_stream_whose_event_loop_closed_does_not_kill_the_engine(engine):
    def orphan():  # a caller on another event loop that goes away mid-stream
        loop = asyncio.new_event_loop()

        async def start():
            stream = engine.submit(
                chat("Write a long essay about the sea."), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
            )
            await stream.__anext__()

        loop.run_until_complete(start())
        loop.close()

    await asyncio.to_thread(orphan)
    for _ in range(200):  # the engine notices the closed loop and aborts the orphan
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    engine.check_health()
    assert stats["running"] == 0 and stats["kv_cache_bytes"] == 0
    _, ids, _ = await run(engine, chat("What is 2+2?"), temperature=0, max_tokens=4)
    assert len(ids) > 0


def test_a_hung_step_fails_the_health_check():
    import time

    from engine.errors import EngineDeadError

    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(step_timeout_s=1.0))
    try:
        eng.check_health()
        eng._step_started = time.monotonic() - 5  # as if one step had been running for 5 s
        with pytest.raises(EngineDeadError, match="hung"):
            eng.check_health()
    finally:
        eng._step_started = None
        eng.shutdown()


async def test_a_request_that_cannot_start_fails_alone(engine, monkeypatch):
    """A failure building one request's sampler ends that request with a 400, not the batch."""
    import engine.batch_loop as batch_loop_module
    import engine.mlx_lm_batch as mlx_lm_batch_module

    def picky(real):
        def build(params):
            if params.seed == 666:
                raise ValueError("no such seed")
            return real(params)

        return build

    monkeypatch.setattr(mlx_lm_batch_module, "make_sampler", picky(mlx_lm_batch_module.make_sampler))
    monkeypatch.setattr(batch_loop_module, "row_key", picky(batch_loop_module.row_key))
    await fails_alone(
        engine,
        SamplingParams(temperature=0, max_tokens=4, seed=666),
        InvalidRequestError,
        "no such seed",
        neighbour_tokens=8,
    )
    assert engine.stats()["rejected"] >= 1


async def fails_alone(engine, bad: SamplingParams, error: type, match: str, neighbour_tokens: int) -> None:
    """A request with `bad` ends with `error` while a neighbour submitted beside it finishes in full."""
    neighbour = engine.submit(
        chat("Write a long essay about the moon."), SamplingParams(temperature=0, max_tokens=neighbour_tokens)
    )
    failing = engine.submit(chat("Write a long essay about the sun."), bad)
    with pytest.raises(error, match=match):
        async for _ in failing:
            pass
    outs = [o async for o in neighbour]
    assert outs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs) == neighbour_tokens
    engine.check_health()


def test_out_of_range_seed_and_stop_ids_are_bad_requests():
    for bad in ({"seed": 10**40}, {"stop_token_ids": [10**12]}, {"stop_token_ids": [-1]}):
        with pytest.raises(InvalidRequestError):
            SamplingParams.parse(bad)
    assert SamplingParams.parse({"seed": -5}).seed == -5


async def test_a_request_that_fails_mid_stream_ends_alone_and_the_cache_stays(monkeypatch):
    """A failure in one request's own per-token work (here: its detokenizing) ends that request;
    its neighbours in the batch finish with all their tokens and the prefix cache is not cleared."""
    from engine.text_stream import TextStream

    real_add = TextStream.add

    def add(self, token):
        self.seen = getattr(self, "seen", 0) + 1
        if "BOOM" in self._stop and self.seen > 3:  # the fourth token of the marked request
            raise RuntimeError("detokenizer exploded")
        return real_add(self, token)

    engine = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=64))  # the paged cache on
    try:
        await _fail_one_request_beside_a_neighbour(engine, monkeypatch, add)
    finally:
        engine.shutdown()


async def _fail_one_request_beside_a_neighbour(engine, monkeypatch, add):
    from engine.errors import RequestFailedError
    from engine.text_stream import TextStream

    warm = chat("Write a long essay about the sea.")
    await run(engine, warm, temperature=0, max_tokens=4)  # now cached
    monkeypatch.setattr(TextStream, "add", add)
    await fails_alone(
        engine,
        SamplingParams(temperature=0, max_tokens=16, stop=["BOOM"]),
        RequestFailedError,
        "detokenizer exploded",
        neighbour_tokens=16,
    )
    cache = engine.stats()["cache"]
    assert cache["live_sequences"] == 0 and cache["blocks_used"] == 0  # the failed request's blocks are back
    _, _, outs = await run(engine, warm, temperature=0, max_tokens=4)
    assert outs[-1].usage.cached_tokens > 0  # the prefix cache survived


async def test_a_failed_step_ends_its_batch_with_an_error_and_the_engine_serves_on(monkeypatch):
    """An exception inside a batched step (no single request known as its cause): the requests in
    that batch end with an error (never a silent empty answer); a request still waiting for
    admission is not lost and runs next, from the prefix a finished request left (a failed step
    drops only what it may have half-written); the engine stays healthy and nothing leaks."""
    from engine.batch_loop import BatchLoop
    from engine.errors import RequestFailedError

    eng = AsyncEngine.from_source(SMOLLM, EngineConfig(cache_memory_mb=3))  # one block: the second waits
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        solo = (await run(eng, chat(QUESTIONS[1]), temperature=0, max_tokens=12, ignore_eos=True))[1]
        cached_before = eng.stats()["cache"]["indexed_blocks"]
        real, calls = BatchLoop._issue_decode, []

        def flaky(self):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("injected step failure")
            return real(self)

        monkeypatch.setattr(BatchLoop, "_issue_decode", flaky)
        running = eng.submit(chat(QUESTIONS[0]), params)
        waiting = eng.submit(chat(QUESTIONS[1]), params)
        first, second = await asyncio.gather(collect(running), collect(waiting), return_exceptions=True)
        assert isinstance(first, RequestFailedError) and "injected step failure" in str(first)
        assert second[1] == solo  # it waited, then ran in the fresh loop
        assert second[2][-1].usage.cached_tokens > 0  # from the first run: the failure left the prefix cache
        assert cached_before > 0
        eng.check_health()
        cache = eng.stats()["cache"]
        assert cache["live_sequences"] == 0 and cache["blocks_used"] == 0
        assert len((await run(eng, chat(QUESTIONS[2]), temperature=0, max_tokens=4))[1]) > 0
    finally:
        eng.shutdown()


async def test_the_pipelined_loop_gives_the_same_tokens_as_the_unpipelined_one():
    """The GPU's loop (step k+1 issued before step k's tokens are read), forced on here, against
    the CPU's default: the same greedy tokens in a batch with a late insert, a row ending early on
    a stop token while the others go on (its spare in-flight token is dropped), and every block
    back afterwards."""
    config = EngineConfig(cache_memory_mb=64)
    base = AsyncEngine.from_source(SMOLLM, config)
    eng = AsyncEngine.from_source(SMOLLM, config.model_copy(update={"pipelined_decode": True}))
    try:
        assert base.scheduler.gen.pipelined is False and eng.scheduler.gen.pipelined is True
        _, probe, _ = await run(base, chat(QUESTIONS[1]), temperature=0, max_tokens=12)
        stopper = dict(temperature=0, max_tokens=12, stop_token_ids=[probe[3]])
        want = [(await run(base, chat(q), temperature=0, max_tokens=12))[1] for q in QUESTIONS]
        want[1] = (await run(base, chat(QUESTIONS[1]), **stopper))[1]
        assert want[1] == probe[:3]  # the stop token itself is not output

        first = [
            eng.submit(chat(q), SamplingParams(**(stopper if i == 1 else dict(temperature=0, max_tokens=12))))
            for i, q in enumerate(QUESTIONS[:4])
        ]
        heads = [await s.__anext__() for s in first]
        late = eng.submit(chat(QUESTIONS[4]), SamplingParams(temperature=0, max_tokens=12))
        rests = await asyncio.gather(*(collect(s) for s in [*first, late]))
        got = [h.token_ids + r[1] for h, r in zip(heads, rests[:4])] + [rests[4][1]]
        assert got == want
        assert rests[1][2][-1].finish_reason == "stop"
        for _ in range(100):
            if eng.stats()["running"] == 0:
                break
            await asyncio.sleep(0.05)
        assert eng.stats()["cache"]["blocks_used"] == 0
    finally:
        eng.shutdown()
        base.shutdown()


@pytest.mark.parametrize("pipelined", [False, True])
def test_an_unpipelined_step_reports_its_own_tokens(smollm, pipelined):
    """Unpipelined (the CPU's default), the step that computes a token reports it (pipelined, the
    step after). A short prompt's first token is computed by the step that prefills it: its
    chunk, then its first decode step, in one step (not a step of latency more)."""
    from engine.kv.manager import make_cache_manager
    from engine.request import Request
    from engine.scheduler import Scheduler
    from engine.text_stream import TextStream

    config = EngineConfig(pipelined_decode=pipelined)
    model, tokenizer = smollm.model, smollm.tokenizer
    sched = Scheduler(model, tokenizer, config, make_cache_manager(model, config))
    ids = tokenizer.encode("The river")  # shorter than a prefill chunk: one prefill step, then decode
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    sched.add(Request("s", ids, params, 3, TextStream(tokenizer.detokenizer, [])))
    steps_with_tokens = []
    for step in range(1, 10):
        if any(o.token_ids for o in sched.step()):
            steps_with_tokens.append(step)
        if not sched.has_work():
            break
    sched.gen.close()
    # the prompt's chunk and its first decode step at step 1 (reported there, or at 2 pipelined)
    assert steps_with_tokens == ([2, 3, 4] if pipelined else [1, 2, 3])


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_penalty_row_counts_each_token_once_when_a_neighbour_joins(smollm, pipelined):
    """A frequency penalty counts the prompt and every output token once, also across a step
    where the batch is rebuilt for a neighbour that joins (unpipelined, the running row's input
    is already in its host history then: counted twice, it skewed the row's penalties)."""
    from engine.kv.manager import make_cache_manager
    from engine.request import Request
    from engine.scheduler import Scheduler
    from engine.text_stream import TextStream

    config = EngineConfig(pipelined_decode=pipelined)
    model, tokenizer = smollm.model, smollm.tokenizer
    sched = Scheduler(model, tokenizer, config, make_cache_manager(model, config))

    def add(rid, text, **penalty):
        ids = tokenizer.encode(text)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, **penalty)
        sched.add(Request(rid, ids, params, 8, TextStream(tokenizer.detokenizer, [])))
        return ids

    prompt = add("pen", "The river runs", frequency_penalty=0.5)
    for _ in range(3):
        sched.step()
    add("late", "A short poem")
    sched.step()  # the late row's chunk, then a decode step of a rebuilt batch
    loop = sched.gen
    row = loop.rows["pen"]
    assert [r.request.request_id for r in loop.batch.rows] == ["pen", "late"]
    inputs = prompt + sched.requests["pen"].output_ids[: row.issued - 1]  # what its steps consumed
    want = np.bincount(inputs, minlength=loop.batch.sampling.counts.shape[-1])
    assert np.array_equal(np.asarray(loop.batch.sampling.counts[0]), want)
    loop.close()


def test_short_prompts_share_a_prefill_chunk_within_its_token_slots_and_keep_their_outputs(smollm):
    """A prefill chunk holds prefill_batch_size x prefill_step_size token slots, padding counted
    (here 2 x 16 = 32): six short prompts go in one chunk (two at a time before), long ones two at
    most; no chunk exceeds the slots, and every greedy output equals its prompt's alone (SmolLM2,
    the bundled GGUF)."""
    from engine.kv.manager import make_cache_manager
    from engine.request import Request
    from engine.scheduler import Scheduler
    from engine.text_stream import TextStream

    config = EngineConfig(prefill_batch_size=2, prefill_step_size=16, max_num_seqs=8, pipelined_decode=False)
    model, tokenizer = smollm.model, smollm.tokenizer
    short = [
        "The old river bend",
        "A small grey cat",
        "Red sky at night",
        "Two dogs ran far",
        "Old town square",
        "Blue waves crash",
    ]
    long = [
        f"{w}: the long road to the northern mountains winds past old farms, rivers, lakes and quiet villages"
        for w in "ABC"
    ]
    prompts = {f"s{i}": tokenizer.encode(t) for i, t in enumerate(short)}
    prompts.update({f"l{i}": tokenizer.encode(t) for i, t in enumerate(long)})
    assert max(len(prompts[f"s{i}"]) for i in range(6)) <= 6 and min(len(prompts[f"l{i}"]) for i in range(3)) > 17

    def run(names):
        sched = Scheduler(model, tokenizer, config, make_cache_manager(model, config))
        loop, chunks = sched.gen, []
        chunk = loop._chunk

        def recording(rows):
            n, real = chunk(rows)
            chunks.append((len(rows), n))
            return n, real

        loop._chunk = recording
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for n in names:
            sched.add(Request(n, prompts[n], params, 4, TextStream(tokenizer.detokenizer, [])))
        outputs = {n: [] for n in names}
        while sched.has_work():
            for out in sched.step():
                outputs[out.request_id] += out.token_ids
        loop.close()
        return chunks, outputs

    chunks, batched = run(list(prompts))
    assert chunks[0][0] == 6  # the six short prompts in the first chunk
    assert all(rows * width <= 32 for rows, width in chunks)
    assert max(rows for rows, width in chunks if width == 16) == 2
    solo = {n: run([n])[1][n] for n in prompts}
    assert batched == solo
