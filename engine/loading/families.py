"""Tiny models of 24 mlx_lm families, for conformance tests of every kind of cache state.

Each config is the family's real Hugging Face config.json (the checkpoint named in `source`)
scaled down — hidden size 64, 2-6 layers, a few heads, a 512-token vocabulary, EOS id 0 — with
what makes the family's cache different kept (`keeps`): the layer pattern (sliding-window,
chunked, linear-attention, conv, Mamba and shared-KV layers at the real ratio where a few layers
allow), the attention kind (grouped, latent, sinks, soft-capped) and the routing. A window or a
chunk is scaled down to 16-32 tokens so that a test's prompts cross it.

Weights are random and seeded (built by engine.loading.synthetic): at MLX's default
initialisation a tiny model repeats one token, which hides cache bugs, so every weight matrix is
scaled (SCALE, or the family's own `scale` / `embed_scale` where tied, scaled-up embeddings would
make it copy its input) and every vector (norms, biases, sinks, D) gets noise; Mamba-style `A_log`
and `dt_bias` take Mamba2's initialisation, as mlx_lm's constants make every head decay alike.
Each family's scale is the one whose solo greedy steps have no near ties (tests/engine/test_families.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

SEED = 0
SCALE = 3.0  # weight matrices are MLX's default initialisation times this
NOISE = 0.1  # standard deviation of the noise added to every vector

VOCAB = 512
HIDDEN = 64
# Every config's vocabulary and width, EOS 0 (BOS and padding too: the real ids are out of range).
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "eos_token_id": 0,
    "bos_token_id": 0,
    "pad_token_id": 0,
    "max_position_embeddings": 4096,
}


@dataclass(frozen=True)
class Family:
    source: str  # the Hugging Face checkpoint whose config.json this one scales down
    keeps: str  # what of the family's cache and attention the tiny config keeps
    config: dict
    scale: float = SCALE
    embed_scale: float | None = None  # the token embeddings' own scale (default: `scale`)


def _attention(heads: int, kv_heads: int, head_dim: int | None = None) -> dict:
    """The attention's width: query heads, KV heads, and the head size where the config names it."""
    return {"num_attention_heads": heads, "num_key_value_heads": kv_heads} | (
        {"head_dim": head_dim} if head_dim else {}
    )


# Qwen3.5's text layout, dense and MoE alike: 3 gated delta-net layers to 1 full attention layer.
_QWEN3_5_HYBRID = {
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "full_attention_interval": 4,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_value_head_dim": 16,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {
        "mrope_interleaved": True,
        "mrope_section": [2, 1, 1],
        "rope_type": "default",
        "rope_theta": 10000000,
        "partial_rotary_factor": 0.25,
    },
    "tie_word_embeddings": False,
}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "meta-llama/Llama-3.2-1B",
        "grouped-query attention (4:1), llama3 RoPE scaling, tied embeddings",
        {
            "model_type": "llama",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "max_position_embeddings": 131072,
            "tie_word_embeddings": True,
        },
    ),
    "qwen2": Family(
        "Qwen/Qwen2.5-0.5B-Instruct",
        "QKV biases, grouped-query attention, tied embeddings",
        {
            "model_type": "qwen2",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 1),
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3": Family(
        "Qwen/Qwen3-0.6B",
        "Q/K RMS norms, head_dim x heads wider than the hidden size, grouped-query attention",
        {
            "model_type": "qwen3",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 2, 32),
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
        },
        scale=5.0,
    ),
    "qwen3_moe": Family(
        "Qwen/Qwen3-30B-A3B",
        "sparse MoE in every layer (top-2 of 8 here, 8 of 128 there), Q/K norms, untied head",
        {
            "model_type": "qwen3_moe",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            **_attention(4, 1, 16),
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        },
    ),
    "mistral": Family(
        "mistralai/Ministral-8B-Instruct-2410",
        "sliding-window layers (RotatingKVCache) interleaved with full ones: the real sliding_window (32768) scaled to 16; mlx_lm reads sliding layers from layer_types only",
        {
            "model_type": "mistral",
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000000.0,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "tie_word_embeddings": False,
        },
    ),
    "mistral4": Family(
        "mistralai/Mistral-Small-4-119B-2603 (text_config)",
        "latent KV (MLA: the cache holds the compressed latent + RoPE key), MoE with a shared expert, yarn RoPE",
        {
            "model_type": "mistral4",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            **_attention(4, 4),
            "n_shared_experts": 1,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "routed_scaling_factor": 1.0,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
            "norm_topk_prob": True,
            "topk_group": 1,
            "n_group": 1,
            "first_k_dense_replace": 0,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 128.0,
                "original_max_position_embeddings": 8192,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "llama_4_scaling_beta": 0.1,
            },
            "max_position_embeddings": 1048576,
            "tie_word_embeddings": False,
        },
    ),
    "gemma3_text": Family(
        "google/gemma-3-1b-it",
        "5 sliding-window layers (window 16) to 1 global (sliding_window_pattern 6), one KV head, query_pre_attn_scalar, local/global RoPE bases",
        {
            "model_type": "gemma3_text",
            "num_hidden_layers": 6,
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "sliding_window": 16,
            "sliding_window_pattern": 6,
        },
    ),
    "phi3": Family(
        "microsoft/Phi-3-mini-4k-instruct",
        "full multi-head attention (KV heads = heads), fused QKV and gate/up projections",
        {
            "model_type": "phi3",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 4),
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
        },
    ),
    "gpt_oss": Family(
        "openai/gpt-oss-20b",
        "attention sinks, sliding-window (16) and full layers alternating, MoE (top-2 of 4), yarn RoPE",
        {
            "model_type": "gpt_oss",
            "num_hidden_layers": 4,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "head_dim": 16,
            **_attention(4, 2),
            "sliding_window": 16,
            "rms_norm_eps": 1e-5,
            "rope_theta": 150000,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "original_max_position_embeddings": 4096,
            },
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "max_position_embeddings": 131072,
        },
    ),
    "olmo2": Family(
        "allenai/OLMo-2-0425-1B",
        "norms after attention and MLP (not before), Q/K norms over the whole projection",
        {
            "model_type": "olmo2",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 4),
            "rms_norm_eps": 1e-6,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
        },
    ),
    "glm4": Family(
        "THUDM/GLM-4-9B-0414",
        "partial rotary (half the head), sandwich norms, QKV biases, grouped-query attention (one KV head)",
        {
            "model_type": "glm4",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "attention_bias": True,
            "partial_rotary_factor": 0.5,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
        },
    ),
    "deepseek_v3": Family(
        "deepseek-ai/DeepSeek-V3",
        "latent KV (MLA), a dense first layer then MoE (sigmoid, grouped top-k, shared expert), yarn RoPE",
        {
            "model_type": "deepseek_v3",
            "num_hidden_layers": 3,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            **_attention(4, 4),
            "n_shared_experts": 1,
            "n_routed_experts": 8,
            "routed_scaling_factor": 2.5,
            "kv_lora_rank": 32,
            "q_lora_rank": 48,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "qk_nope_head_dim": 16,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "norm_topk_prob": True,
            "n_group": 2,
            "topk_group": 1,
            "num_experts_per_tok": 2,
            "moe_layer_freq": 1,
            "first_k_dense_replace": 1,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40.0,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
            },
            "max_position_embeddings": 163840,
            "attention_bias": False,
        },
    ),
    "smollm3": Family(
        "HuggingFaceTB/SmolLM3-3B",
        "NoPE every 4th layer (no_rope_layer_interval 4), grouped-query attention, tied embeddings",
        {
            "model_type": "smollm3",
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            **_attention(4, 1),
            "rms_norm_eps": 1e-6,
            "rope_theta": 5000000.0,
            "no_rope_layer_interval": 4,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3_5": Family(
        "Qwen/Qwen3.5-9B (text_config)",
        "gated delta-net layers (ArraysCache: conv + recurrent state) 3 to 1 full attention layer, gated attention output, partial multimodal RoPE",
        {
            "model_type": "qwen3_5",
            "text_config": {
                "model_type": "qwen3_5_text",
                "num_hidden_layers": 4,
                "intermediate_size": 128,
                **_attention(4, 2, 32),
                **_QWEN3_5_HYBRID,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen3_5_moe": Family(
        "Qwen/Qwen3.5-35B-A3B (text_config)",
        "gated delta-net layers 3 to 1 full attention, sparse MoE with a shared expert in every layer",
        {
            "model_type": "qwen3_5_moe",
            "text_config": {
                "model_type": "qwen3_5_moe_text",
                "num_hidden_layers": 4,
                **_attention(4, 1, 32),
                **_QWEN3_5_HYBRID,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
            },
            "tie_word_embeddings": False,
        },
    ),
    "qwen3_next": Family(
        "Qwen/Qwen3-Next-80B-A3B-Instruct",
        "gated delta-net layers with full attention every 4th (full_attention_interval 4), sparse MoE with a shared expert, partial RoPE",
        {
            "model_type": "qwen3_next",
            "num_hidden_layers": 4,
            "intermediate_size": 128,
            **_attention(4, 1, 32),
            "full_attention_interval": 4,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_value_head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "norm_topk_prob": True,
            "partial_rotary_factor": 0.25,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000000.0,
            "tie_word_embeddings": False,
        },
    ),
    "lfm2": Family(
        "LiquidAI/LFM2-1.2B",
        "short-convolution layers (ArraysCache, conv_L_cache 3) with attention at the real pattern's first places (2 and 5 of 6)",
        {
            "model_type": "lfm2",
            "num_hidden_layers": 6,
            **_attention(4, 2),
            "norm_eps": 1e-5,
            "conv_bias": False,
            "conv_L_cache": 3,
            "block_dim": HIDDEN,
            "block_ff_dim": 128,
            "block_multiple_of": 16,
            "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": True,
            "rope_theta": 1000000.0,
            "layer_types": ["conv", "conv", "full_attention"] * 2,
            "tie_word_embeddings": True,
        },
    ),
    "granitemoehybrid": Family(
        "ibm-granite/granite-4.0-h-small",
        "Mamba2 layers (ArraysCache, lengths-aware) with one attention layer in four, no positional embedding, MoE with a shared expert, Granite's multipliers",
        {
            "model_type": "granitemoehybrid",
            "num_hidden_layers": 4,
            "intermediate_size": 32,
            **_attention(4, 1),
            "attention_bias": False,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.0078125,
            "logits_scaling": 8.0,
            "residual_multiplier": 0.22,
            "layer_types": ["mamba", "attention", "mamba", "mamba"],
            "rms_norm_eps": 1e-5,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "shared_intermediate_size": 64,
            "mamba_n_heads": 8,
            "mamba_d_head": 16,
            "mamba_proj_bias": False,
            "mamba_d_state": 16,
            "mamba_d_conv": 4,
            "mamba_n_groups": 1,
            "mamba_conv_bias": True,
            "position_embedding_type": "nope",
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
        },
        scale=12.0,
    ),
    "falcon_h1": Family(
        "tiiuae/Falcon-H1-1.5B-Instruct",
        "attention and Mamba2 side by side in every layer (CacheList of an ArraysCache and a KV cache), muP multipliers (mlx_lm's defaults)",
        {
            "model_type": "falcon_h1",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(4, 2, 16),
            "mamba_d_ssm": 64,
            "mamba_d_state": 16,
            "mamba_d_head": 16,
            "mamba_n_heads": 4,
            "mamba_n_groups": 1,
            "mamba_d_conv": 4,
            "mamba_chunk_size": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 100000000000.0,
            "tie_word_embeddings": False,
        },
    ),
    "mamba2": Family(
        "mistralai/Mamba-Codestral-7B-v0.1",
        "state-space only: every layer a Mamba2 block (ArraysCache: conv + SSM state), grouped B/C",
        {
            "model_type": "mamba2",
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 16,
            "intermediate_size": 128,
            "state_size": 16,
            "n_groups": 2,
            "conv_kernel": 4,
            "layer_norm_epsilon": 1e-5,
            "use_bias": False,
            "use_conv_bias": True,
            "time_step_limit": [0.0, float("inf")],
            "time_step_rank": "auto",
            "tie_word_embeddings": False,
        },
    ),
    "gemma4_text": Family(
        "google/gemma-4-E2B (text_config)",
        "KV-sharing layers (the last 3 of 6 reuse earlier layers' K/V: fewer caches than layers), sliding (16) and global layers with their own head sizes, per-layer input embeddings",
        {
            "model_type": "gemma4_text",
            "num_hidden_layers": 6,
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "global_head_dim": 32,
            "num_kv_shared_layers": 3,
            "hidden_size_per_layer_input": 16,
            "vocab_size_per_layer_input": VOCAB,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
            "use_double_wide_mlp": True,
            "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        scale=8.0,
        embed_scale=0.5,
    ),
    "llama4": Family(
        "meta-llama/Llama-4-Scout-17B-16E-Instruct (text_config)",
        "chunked attention (ChunkedKVCache, chunk 32) in 3 of 4 layers, the 4th global without RoPE, MoE (top-1 of 4) with a shared expert, Q/K norms",
        {
            "model_type": "llama4",
            "text_config": {
                "model_type": "llama4_text",
                "attention_bias": False,
                "attention_chunk_size": 32,
                "head_dim": 16,
                "hidden_size": HIDDEN,
                "interleave_moe_layer_step": 1,
                "intermediate_size": 32,
                "intermediate_size_mlp": 128,
                "max_position_embeddings": 262144,
                "num_attention_heads": 4,
                "num_experts_per_tok": 1,
                "num_hidden_layers": 4,
                "num_key_value_heads": 1,
                "num_local_experts": 4,
                "rms_norm_eps": 1e-5,
                "rope_scaling": {
                    "factor": 8.0,
                    "high_freq_factor": 4.0,
                    "low_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                    "rope_type": "llama3",
                },
                "rope_theta": 500000.0,
                "use_qk_norm": True,
                "vocab_size": VOCAB,
            },
        },
    ),
    "nemotron_h": Family(
        "nvidia/NVIDIA-Nemotron-Nano-9B-v2",
        "Mamba2 mixers, MLP-only and attention layers by hybrid_override_pattern M-M*-M (MLP layers have no cache: 4 caches for 6 layers; the mixers ignore cache.lengths in mlx_lm 0.32.2), ReLU² MLP",
        {
            "model_type": "nemotron_h",
            "hybrid_override_pattern": ["M", "-", "M", "*", "-", "M"],
            "intermediate_size": 128,
            **_attention(4, 1, 16),
            "attention_bias": False,
            "mamba_num_heads": 8,
            "mamba_head_dim": 8,
            "mamba_proj_bias": False,
            "ssm_state_size": 16,
            "conv_kernel": 4,
            "n_groups": 2,
            "mlp_bias": False,
            "layer_norm_epsilon": 1e-5,
            "use_bias": False,
            "use_conv_bias": True,
            "tie_word_embeddings": False,
        },
        scale=4.0,
    ),
    "gemma2": Family(
        "google/gemma-2-2b-it",
        "4 KV heads for 8 query heads (mlx_lm's batch mask breaks on it), attention and final logit soft-capping, query_pre_attn_scalar",
        {
            "model_type": "gemma2",
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            **_attention(8, 4, 16),
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 16,
        },
        embed_scale=0.5,
    ),
}


def config(name: str) -> dict:
    """The family's config.json as a fresh dict (nested text configs get the common fields too)."""
    family = FAMILIES[name]
    cfg = {**COMMON, **copy.deepcopy(family.config)}
    if "text_config" in cfg:
        cfg["text_config"] = {**COMMON, **cfg["text_config"]}
    return cfg
