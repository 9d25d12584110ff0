"""Random-weight vision-language models of real mlx-vlm architectures: `synthetic:<name>` for a VLM.

  synthetic:gemma3-vlm      gemma-3-4b-it's config.json scaled down (text: gemma3_text's tiny
                            family config; vision: a 2-layer SigLIP at 64x64 pixels, patches of 4,
                            pooled 4x4 into 16 image tokens), a small byte-level tokenizer with
                            gemma3's special and image tokens, gemma3's real chat template, and
                            the processor files mlx-vlm's `Gemma3Processor` reads offline
  synthetic:gemma-3-4b-vlm  gemma-3-4b-it's real shapes (text and vision), random weights, the
                            same small tokenizer padded to gemma3's vocabulary size, bf16
                            (for benchmarks on a GPU machine)

The directory is one checkpoint both libraries load: `mlx_lm.load` takes its language model (its
gemma3 drops the vision weights) and `mlx_vlm.load` all of it. Weights are seeded and scaled as
the text families' are (engine.loading.synthetic.randomize), so a wrong merge or cache changes
greedy tokens. Building needs mlx-vlm (`pip install .[vision]`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ModelLoadError
from . import families

# gemma3's special tokens, then the 256 byte symbols, then filler words up to the vocabulary.
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
IMAGE_TOKEN = "<image_soft_token>"
TINY_VOCAB = 512

# google/gemma-3-4b-it's chat template (tokenizer_config.json), as published.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

_TINY_TEXT = {
    **families.config("gemma3_text"),
    "rope_global_base_freq": 1000000.0,  # mlx-vlm's name for mlx_lm's rope_theta
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},  # gemma-3-4b's, on its global layers
    "mm_tokens_per_image": 16,
    "vocab_size": TINY_VOCAB,
}
_TINY_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "image_size": 64,
    "patch_size": 4,
    "layer_norm_eps": 1e-6,
}
# google/gemma-3-4b-it's config.json (text_config and vision_config) and vocabulary size (the
# tokenizer is still ours: its ids past the bytes are filler words).
_4B_TEXT = {
    "model_type": "gemma3_text",
    "hidden_size": 2560,
    "intermediate_size": 10240,
    "num_hidden_layers": 34,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_global_base_freq": 1000000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 131072,
    "mm_tokens_per_image": 256,
    "vocab_size": 262208,
}
_4B_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
    "image_size": 896,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
}
# name -> (text config, vision config, weight scale, embedding scale); the tiny model's scales are
# ones whose greedy output changes with the image within a few tokens
VLMS = {
    "gemma3-vlm": (_TINY_TEXT, _TINY_VISION, 4.0, 0.5),
    "gemma-3-4b-vlm": (_4B_TEXT, _4B_VISION, 1.0, None),
}


def config_of(name: str) -> dict:
    """The checkpoint's config.json (gemma-3-4b-it's layout: gemma3, text_config, vision_config)."""
    text, vision = VLMS[name][:2]
    ids = {tok: i for i, tok in enumerate(SPECIAL)}
    image_id = len(SPECIAL)
    text = copy.deepcopy(text) | {"eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]]}
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": copy.deepcopy(vision),
        "vocab_size": text["vocab_size"],
        "hidden_size": text["hidden_size"],
        "image_token_index": image_id,
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "mm_tokens_per_image": text["mm_tokens_per_image"],
        "pad_token_id": ids["<pad>"],
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "max_position_embeddings": text["max_position_embeddings"],
    }


def make_synthetic_vlm(name: str, out: Path, randomize) -> Path:
    """Write `name`'s checkpoint into `out`: config, weights (drawn by `randomize`, the text
    families' engine.loading.synthetic.randomize), tokenizer, processor files."""
    try:
        import mlx.core as mx
        from mlx.utils import tree_flatten
        from mlx_vlm.models import gemma3
    except ImportError as exc:
        raise ModelLoadError(f"synthetic:{name} is a vision model: pip install '.[vision]' ({exc})") from None
    config = config_of(name)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(families.SEED)
    model_config = gemma3.ModelConfig.from_dict(config)
    model_config.text_config = gemma3.TextConfig.from_dict(config["text_config"])
    model_config.vision_config = gemma3.VisionConfig.from_dict(config["vision_config"])
    model = gemma3.Model(model_config)
    scale, embed_scale = VLMS[name][2:]
    randomize(model, families.Family("google/gemma-3-4b-it", "", {}, scale=scale, embed_scale=embed_scale))
    weights = dict(tree_flatten(model.parameters()))
    weights.pop("language_model.lm_head.weight", None)  # tied, as gemma3 checkpoints are
    if name != "gemma3-vlm":
        weights = {k: v.astype(mx.bfloat16) for k, v in weights.items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(out, config["vocab_size"])
    _write_processor(out, config)
    return out


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    """gemma3's special tokens at ids 0-6, its image token at 7, then the byte symbols; no merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {tok: i for i, tok in enumerate([*SPECIAL, IMAGE_TOKEN])}
    vocab.update({c: len(vocab) + i for i, c in enumerate(sorted(ByteLevel.alphabet()))})
    vocab.update({f"\u0120w{i}": i for i in range(len(vocab), vocab_size)})
    tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*SPECIAL, IMAGE_TOKEN]])
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "extra_special_tokens": {
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": IMAGE_TOKEN,
        },
        "chat_template": GEMMA3_TEMPLATE,
        "model_max_length": 131072,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _write_processor(out: Path, config: dict) -> None:
    """What mlx-vlm's Gemma3Processor and transformers' Gemma3ImageProcessor read (gemma-3-4b-it's
    values, the image size ours)."""
    size = config["vision_config"]["image_size"]
    image = {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_seq_length": config["mm_tokens_per_image"],
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": size, "width": size},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    processor = {"processor_class": "Gemma3Processor", "image_seq_length": config["mm_tokens_per_image"]}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
