"""Vision-language models in the engine, on `synthetic:gemma3-vlm`: mlx-vlm's gemma3 (gemma-3-4b-it's
config scaled down, random weights, a 16-token image) whose language model mlx_lm loads and whose
vision tower mlx-vlm's classes run. References: mlx-vlm's own `generate` on the same checkpoint,
the same request alone, and the same request with the prefix cache cleared."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

pytest.importorskip("mlx_vlm")

from engine.config import EngineConfig  # noqa: E402
from engine.engine import AsyncEngine  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.request import PromptInput  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.vision.encoder import refusal  # noqa: E402
from engine.vision.prompt import ImageSpan, VisionPrompt  # noqa: E402

from .helpers import collect  # noqa: E402

VLM = "synthetic:gemma3-vlm"
BLOCK = 8
CONFIG = EngineConfig(block_size=BLOCK, prefill_step_size=16, prefill_batch_size=4, cache_memory_mb=16, max_images=3)
TOKENS = 12


def png(seed: int, size: tuple[int, int] = (40, 50)) -> bytes:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def ask(text: str, *images: bytes, system: str | None = None) -> PromptInput:
    parts = [{"type": "text", "text": text}] + [{"type": "image"} for _ in images]
    messages = [{"role": "system", "content": system}] if system else []
    return PromptInput(messages=[*messages, {"role": "user", "content": parts}], images=list(images) or None)


async def greedy(engine: AsyncEngine, prompt: PromptInput, tokens: int = TOKENS):
    _, ids, outs = await collect(engine.submit(prompt, SamplingParams(max_tokens=tokens, temperature=0.0)))
    return ids, outs[-1].usage


@pytest.fixture(scope="module")
def vlm():
    eng = AsyncEngine(VLM, CONFIG)
    yield eng
    eng.shutdown()


def image_start(engine: AsyncEngine, prompt: PromptInput) -> int:
    """Where the prompt's first image token is."""
    text = engine.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    _, vision = engine.vision.encoder.prepare(text, prompt.images)
    return vision.spans[0].start


def mlx_vlm_greedy(engine: AsyncEngine, prompt: PromptInput, tokens: int = TOKENS) -> list[int]:
    from mlx_vlm import generate, load
    from mlx_vlm.utils import load_image

    model, processor = load(str(engine.loaded.model_path))
    text = engine.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    images = [load_image(io.BytesIO(b)) for b in prompt.images]
    out = generate(model, processor, text, image=images, max_tokens=tokens, temperature=0.0, verbose=False)
    return list(out.token_ids)


async def test_an_image_prompt_decodes_as_mlx_vlm_generate_does(vlm):
    prompt = ask("What is in this picture?", png(0))
    ids, _ = await greedy(vlm, prompt)
    assert ids == mlx_vlm_greedy(vlm, prompt)


async def test_two_images_in_one_message_decode_as_mlx_vlm_generate_does(vlm):
    prompt = ask("Compare these two.", png(1), png(2))
    ids, _ = await greedy(vlm, prompt)
    assert ids == mlx_vlm_greedy(vlm, prompt)


async def test_an_image_request_batched_with_text_requests_and_another_image_decodes_as_alone(vlm):
    prompts = [
        ask("Describe it.", png(3)),
        PromptInput(messages=[{"role": "user", "content": "Tell me a story about a long river."}]),
        ask("Which colours are in this image, and where?", png(4)),
        PromptInput(messages=[{"role": "user", "content": "Hi"}]),
    ]
    alone = []
    for p in prompts:
        vlm.clear_cache()
        alone.append((await greedy(vlm, p))[0])
    vlm.clear_cache()
    together = await asyncio.gather(*(greedy(vlm, p) for p in prompts))
    assert [ids for ids, _ in together] == alone
    assert vlm.stats()["batch_peak"] >= 2


async def test_the_same_image_and_prompt_again_is_a_prefix_hit_past_the_image_with_the_same_output(vlm):
    prompt = ask("What do you see here?", png(5))
    vlm.clear_cache()
    first, _ = await greedy(vlm, prompt)
    again, usage = await greedy(vlm, prompt)
    assert again == first
    spans_end = image_start(vlm, prompt) + 16
    assert usage.cached_tokens > spans_end


async def test_another_image_with_the_same_text_reuses_nothing_past_the_image_and_decodes_as_cache_off(vlm):
    text = "What do you see here?"
    vlm.clear_cache()
    await greedy(vlm, ask(text, png(6)))
    other = ask(text, png(7))
    ids, usage = await greedy(vlm, other)
    assert usage.cached_tokens <= image_start(vlm, other)
    vlm.clear_cache()
    cold, _ = await greedy(vlm, other)
    assert ids == cold


async def test_a_shared_system_prompt_before_the_image_is_still_shared(vlm):
    system = "You are a careful assistant who describes pictures for blind readers."
    vlm.clear_cache()
    await greedy(vlm, ask("Describe.", png(8), system=system))
    other = ask("Describe.", png(9), system=system)
    ids, usage = await greedy(vlm, other)
    start = image_start(vlm, other)
    assert start // BLOCK * BLOCK <= usage.cached_tokens <= start
    assert start >= 2 * BLOCK  # the system prompt fills whole blocks before the image
    vlm.clear_cache()
    assert ids == (await greedy(vlm, other))[0]


async def test_the_encoder_cache_serves_an_image_seen_before_with_another_prompt(vlm):
    image = png(10)
    before = vlm.stats()["vision"]["encoder_cache"]
    await greedy(vlm, ask("First question?", image), tokens=2)
    await greedy(vlm, ask("Second question, another one?", image), tokens=2)
    after = vlm.stats()["vision"]["encoder_cache"]
    assert after["misses"] == before["misses"] + 1
    assert after["hits"] == before["hits"] + 1
    assert vlm.stats()["vision"]["family"] == "gemma3"


def test_the_footprint_counts_the_vision_tower_and_the_encoder_cache(vlm):
    encoder = vlm.vision.encoder
    assert vlm.footprint.weights == vlm.loaded.weights_bytes + encoder.weights_bytes
    assert encoder.weights_bytes > 0
    assert vlm.footprint.working >= encoder.cache_bytes + CONFIG.max_num_seqs * CONFIG.max_images * encoder.image_bytes
    assert encoder.image_bytes == 16 * 64 * 4  # 16 tokens x hidden 64, float32


def test_images_the_model_cannot_take_are_refused_naming_the_image(vlm):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(InvalidRequestError) as bad:
        vlm.submit(ask("What?", png(0), b"not an image"), params)
    assert bad.value.param == "images[1]"
    with pytest.raises(InvalidRequestError) as many:
        vlm.submit(ask("What?", *(png(i) for i in range(4))), params)
    assert many.value.param == "images[3]"
    mismatch = PromptInput(messages=[{"role": "user", "content": [{"type": "image"}]}], images=[png(0), png(1)])
    with pytest.raises(InvalidRequestError) as parts:
        vlm.submit(mismatch, params)
    assert parts.value.param == "images"


async def test_images_to_a_text_only_model_are_refused_naming_messages():
    eng = AsyncEngine("synthetic:gemma3_text", EngineConfig(cache_memory_mb=8, batch_check=False))
    try:
        with pytest.raises(InvalidRequestError) as refused:
            eng.submit(ask("What?", png(0)), SamplingParams(max_tokens=2))
        assert refused.value.param == "messages"
        assert "does not take images" in refused.value.message
    finally:
        eng.shutdown()


def test_qwen_vl_families_are_served_text_only_and_their_images_refused_by_name():
    why = refusal({"model_type": "qwen2_5_vl", "vision_config": {}})
    assert "qwen2_5_vl" in why and "M-RoPE" in why
    assert refusal({"model_type": "gemma3", "vision_config": {}}) is None
    assert refusal({"model_type": "llama"}) is None


def test_an_images_tokens_are_keyed_by_the_image_and_the_text_around_them_by_its_ids():
    ids = list(range(100, 120))
    a = VisionPrompt([ImageSpan(5, 4, b"a" * 32)]).cache_ids(ids)
    b = VisionPrompt([ImageSpan(5, 4, b"b" * 32)]).cache_ids(ids)
    assert a[:5] == b[:5] == ids[:5] and a[9:] == b[9:] == ids[9:]
    assert all(x != y and x < 0 and y < 0 for x, y in zip(a[5:9], b[5:9]))
    assert len(set(a[5:9])) == 4


async def test_an_image_request_with_tools_renders_them_and_counts_its_image_tokens(vlm):
    tool = {
        "type": "function",
        "function": {"name": "lookup", "description": "Look a thing up.", "parameters": {"type": "object"}},
    }
    plain = ask("What is this?", png(11))
    with_tools = ask("What is this?", png(11))
    with_tools.tools = [tool]
    ids, usage = await greedy(vlm, with_tools, tokens=4)
    assert len(ids) == 4
    assert usage.prompt_tokens == len(vlm.encode(with_tools)) > len(vlm.encode(plain))
    assert vlm.encode(plain).count(vlm.vision.encoder.image_token) == 16


async def test_image_requests_preempted_in_a_tight_budget_decode_as_alone():
    eng = AsyncEngine(VLM, CONFIG.model_copy(update={"cache_memory_mb": 1, "block_size": 16}))
    try:
        prompts = [ask(f"Question {i}: what is it?", png(20 + i)) for i in range(4)]
        alone = []
        for p in prompts:
            eng.clear_cache()
            alone.append((await greedy(eng, p, tokens=300))[0])
        eng.clear_cache()
        together = await asyncio.gather(*(greedy(eng, p, tokens=300) for p in prompts))
        assert eng.stats()["preempted"] > 0
        assert [ids for ids, _ in together] == alone
    finally:
        eng.shutdown()


def test_a_vision_model_without_mlx_vlm_is_a_load_error_naming_the_extra(vlm, monkeypatch):
    import sys

    from engine.errors import ModelLoadError
    from engine.vision.encoder import VisionEncoder

    monkeypatch.setitem(sys.modules, "mlx_vlm.utils", None)
    with pytest.raises(ModelLoadError, match=r"pip install '\.\[vision\]'"):
        VisionEncoder(vlm.loaded.model_path, vlm.loaded.config, None, False, 1, 0)


def test_the_vision_side_holds_the_towers_weights_and_no_second_language_model(vlm):
    import gc

    import mlx.core as mx

    from engine.vision import text_embedding
    from engine.vision.encoder import VisionEncoder

    loaded = vlm.loaded
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    encoder = VisionEncoder(loaded.model_path, loaded.config, text_embedding(loaded.model), loaded.fast_cpu, 1, 0)
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory() - before
    assert encoder.weights_bytes <= held < encoder.weights_bytes + loaded.weights_bytes // 2


async def test_a_pad_token_in_an_image_prompt_is_zeroed_as_mlx_vlm_does(vlm):
    prompt = ask("Is there a <pad> here?", png(12))
    ids, _ = await greedy(vlm, prompt)
    assert ids == mlx_vlm_greedy(vlm, prompt)


def test_synthetic_gemma3_vlm_is_a_model_source_whose_weight_estimate_counts_the_tower(vlm):
    from engine.loading.sources import resolve_source
    from engine.memory import estimate_weights_bytes

    assert resolve_source(VLM).kind == "synthetic"
    estimate = estimate_weights_bytes(VLM, fast_cpu=True)
    assert estimate >= vlm.loaded.weights_bytes + vlm.vision.encoder.weights_bytes


def test_an_image_past_the_models_pixel_limit_is_refused_before_it_is_decoded():
    eng = AsyncEngine(VLM, CONFIG.model_copy(update={"max_image_pixels": 40 * 50 - 1, "batch_check": False}))
    try:
        with pytest.raises(InvalidRequestError) as big:
            eng.submit(ask("What?", png(0, (10, 10)), png(1, (40, 50))), SamplingParams(max_tokens=2))
        assert big.value.param == "images[1]" and "40" in big.value.message
    finally:
        eng.shutdown()


async def test_an_image_the_prefix_cache_holds_whole_is_not_encoded_again(vlm):
    prompt = ask("Look at this, then answer.", png(13))
    vlm.clear_cache()
    first, _ = await greedy(vlm, prompt)
    before = dict(vlm.stats()["vision"]["encoder_cache"])
    again, usage = await greedy(vlm, prompt)
    after = vlm.stats()["vision"]["encoder_cache"]
    assert again == first and usage.cached_tokens > image_start(vlm, prompt) + 16
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


async def test_a_text_request_to_the_vision_model_decodes_as_mlx_lm_generate_does(vlm):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    prompt = PromptInput(messages=[{"role": "user", "content": "Tell me about rivers."}])
    ids, _ = await greedy(vlm, prompt)
    model, tokenizer = mlx_lm.load(str(vlm.loaded.model_path))
    expected = [
        r.token
        for r in mlx_lm.stream_generate(
            model, tokenizer, vlm.encode(prompt), max_tokens=TOKENS, sampler=make_sampler(temp=0.0)
        )
    ]
    assert ids == expected


def test_a_refused_family_loads_text_only_and_its_images_are_a_400_naming_it():
    from types import SimpleNamespace

    from engine.vision import load_vision

    loaded = SimpleNamespace(
        config={"model_type": "qwen2_5_vl", "vision_config": {}}, source=SimpleNamespace(original="qwen-vl")
    )
    vision = load_vision(loaded, CONFIG)
    assert vision.encoder is None
    with pytest.raises(InvalidRequestError, match="qwen2_5_vl.*M-RoPE") as refused:
        vision.check("qwen-vl", [png(0)], 1)
    assert refused.value.param == "messages"
    vision.check("qwen-vl", None, 0)  # text is served
