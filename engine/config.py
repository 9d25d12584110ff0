"""Engine options. Plain pydantic models, so the YAML `args:` of a deployment map 1:1."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .chat_format import REASONING_FORMATS, TOOL_FORMATS


class DiskCacheConfig(BaseModel):
    """A prefix cache on disk (engine.kv.disk_tier): full KV blocks written behind, read back on a
    prefix hit after an unload or a restart. Off by default: a block file holds the token ids of
    the prompt it came from (the prompt itself) and K/V derived from it, at rest on disk."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False,
        description="Keep full prefix-cache blocks on disk too, so that a model unloaded and loaded "
        "again (or a restarted server) reuses its cached prompts. Off by default: the files hold "
        "prompts' token ids and their K/V, at rest.",
    )
    path: str | None = Field(
        None,
        description="Directory of the blocks; one subdirectory per model identity (weights, block "
        "size, KV dtype, format). Default: `kv-disk` under the engine's cache directory "
        "($ORCHARD_CACHE, else ~/.cache/mlx-orchard).",
    )
    max_gb: float = Field(
        4.0, gt=0, description="Most bytes the model's block files take, in GB; least recently used out."
    )
    queue_mb: int = Field(
        256,
        ge=1,
        description="Most bytes of blocks waiting for the writer thread; blocks offered beyond it are "
        "dropped (counted), never waited for.",
    )


class SpeculativeConfig(BaseModel):
    """Speculative decoding in the continuous batch (engine.speculative): rows propose draft tokens,
    the whole batch verifies them in one forward pass, and each row keeps the longest prefix its
    own sampler agrees with, so outputs are those of decoding without it."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["ngram", "draft"] | None = Field(
        None,
        description="None: off. `ngram`: prompt lookup, drafts copied from where the row's last "
        "tokens occurred before in its prompt or output (no second model; wins when the answer "
        "repeats the prompt: editing, extraction, RAG, code). `draft`: a smaller model that shares "
        "the target's tokenizer (`draft_model`) proposes them.",
    )
    num_draft_tokens: int = Field(4, ge=1, le=16, description="Most tokens a row drafts per step.")
    ngram_max: int = Field(4, ge=1, le=16, description="ngram: the longest suffix looked up.")
    ngram_min: int = Field(2, ge=1, le=16, description="ngram: the shortest suffix looked up.")
    draft_model: str | None = Field(
        None, description="draft: the draft model (a path or Hugging Face id, as `model`), same tokenizer."
    )
    min_acceptance: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="A row whose recent share of accepted draft tokens falls below this stops drafting "
        "for a while (longer each time), so output that does not repeat costs nearly nothing.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SpeculativeConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError("ngram_min must not exceed ngram_max")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("draft_model is needed with method: draft, and only with it")
        return self


class AdapterConfig(BaseModel):
    """A LoRA adapter of the model, served by name (engine.adapters)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="What clients send as `model` to get this adapter.")
    path: str = Field(
        ...,
        min_length=1,
        description="Directory in mlx_lm's adapter format: adapter_config.json and adapters.safetensors, "
        "as `mlx_lm.lora` writes them.",
    )


class EngineConfig(BaseModel):
    """How one model is run: scheduling, streaming and KV cache."""

    model_config = ConfigDict(extra="forbid")

    continuous_batching: bool = Field(
        True,
        description="Continuous batching (requests join and leave the running batch between steps). "
        "False is simple mode: one request at a time, the others wait in FIFO order.",
    )
    max_num_seqs: int = Field(16, ge=1, le=1024, description="Most sequences decoding at once.")
    prefill_batch_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Prompts of prefill_step_size tokens one prefill chunk holds: a chunk is at most this "
        "many x prefill_step_size tokens, padding counted (the shape whose working memory is measured at "
        "load), so shorter prompts are prefilled more at once, up to max_num_seqs. mlx_lm's BatchGenerator "
        "(the fallback loop) takes it as a count of prompts.",
    )
    prefill_step_size: int = Field(
        512,
        ge=16,
        le=65536,
        description="Prompt tokens per prefill chunk; decoding sequences step between chunks.",
    )
    stream_interval: int = Field(
        1, ge=1, le=1024, description="Emit output every N tokens (1 = every token); the last chunk is always flushed."
    )
    max_waiting: int = Field(
        256, ge=1, description="Most requests waiting for a slot before new ones are refused (503)."
    )
    context_length: int | None = Field(
        None, ge=16, description="Prompt + completion limit in tokens; default: the model's own context length."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template (Hugging Face style: `messages`, `add_generation_prompt`, "
        "`bos_token`) used instead of the tokenizer's; lets base models without one take chat messages.",
    )
    tool_prompt: str | None = Field(
        None,
        description="The system-prompt text that describes tools to a model whose chat template does "
        "not take them (in the Hermes <tool_call> format); `{tools}` becomes one JSON schema per line. "
        "Default: the Hermes prompt (engine.tool_prompt.HERMES_SYSTEM).",
    )
    tool_format: Literal[TOOL_FORMATS] | None = Field(
        None,
        description="The call syntax of the model's output (engine.chat_format). None: read from the chat template.",
    )
    reasoning_format: Literal[REASONING_FORMATS] | Literal["none"] | None = Field(
        None,
        description="Where the model writes its thinking, kept out of the answer's content "
        "(engine.chat_format). None: read from the chat template; none: the model does not think.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Variables for the chat template, e.g. {enable_thinking: false}; a request's own "
        "chat_template_kwargs (and its reasoning_effort) override them. Each must be a variable the "
        "template reads, or the model refuses to start.",
    )
    max_thinking_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens a request may spend inside its reasoning block; then the block's "
        "closing tag is forced and the answer follows. A request may ask for fewer (Anthropic's "
        "thinking.budget_tokens). None: no cap.",
    )
    fast_cpu: bool | None = Field(
        None, description="Dequantize to float32 for the OpenBLAS CPU path. None: automatic (CPU-only Linux)."
    )
    compiled_decode: bool = Field(
        True,
        description="Decode steps through working copies run as one compiled MLX function (traced "
        "once per batch shape), instead of the model's Python every step; the paged cache only.",
    )
    pipelined_decode: bool | None = Field(
        None,
        description="Issue decode step k+1 before reading step k's tokens (engine.batch_loop). None: "
        "automatic, on a GPU only: on the CPU, MLX runs nearly all of a step inside async_eval, so "
        "pipelining would hold every token back a step.",
    )
    decode_column_write: Literal["slice", "select"] | None = Field(
        None,
        description="How the compiled decode step writes its KV column into the working copies: "
        "a slice update, or a select with the column's one-hot (engine.compiled_step). None: automatic, "
        "select on CUDA, where MLX's dynamic slice update runs a thread per element of the whole copy.",
    )
    unpadded_decode: Literal["eager", "compiled"] | None = Field(
        None,
        description="A decode batch whose rows all have one length (one row always has) needs no "
        "attention mask: run its steps eagerly and unmasked, or through the compiled step, which masks its "
        "whole copy. None: automatic, eager on CUDA, where MLX's fused vector attention refuses a mask.",
    )
    adaptive_cpu_threads: bool = Field(
        True,
        description="While busy, give OpenBLAS (the CPU fast path) the cores other processes leave "
        "free, from 1 up to the threads it started with (engine.cpu_threads); false keeps them fixed.",
    )
    step_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A step running longer than this makes the health check fail (a hung "
        "engine: Ray Serve replaces the replica).",
    )
    # KV cache
    paged_cache: bool = Field(True, description="Paged KV cache with prefix sharing (block pool).")
    block_size: int = Field(32, ge=1, le=4096, description="Tokens per KV block.")
    cache_memory_mb: int | None = Field(
        None, ge=1, description="KV cache budget in MB; overrides cache_memory_percent."
    )
    cache_memory_percent: float = Field(
        0.20,
        gt=0,
        le=0.95,
        description="KV cache budget as a fraction of memory: of the host memory budget (args.memory) under "
        "Ray Serve, of RAM for the engine alone.",
    )
    kv_admission: Literal["on_demand", "reserve"] = Field(
        "on_demand",
        description="on_demand: a request starts when its prompt's blocks fit and takes blocks "
        "as it grows; when the pool runs out the newest running request is preempted (its blocks go to "
        "the prefix cache, it resumes from there later). reserve: a request starts only when its worst "
        "case (prompt + max_tokens) fits next to the running requests' worst cases.",
    )
    memory_aware: bool = Field(True, description="Budget by bytes (True) or by entry count (False).")
    kv_bits: Literal[16, 8, 4] = Field(
        16,
        description="Bits per stored K/V value in the paged pool: 16 keeps the model's dtype; 8 or 4 store "
        "each block quantized (MLX's affine `mx.quantize` per token along the head dimension, with a "
        "scale and a bias per group), so the same cache_memory_mb holds ~1.9x / ~3.6x the tokens (float16 "
        "model, group 64; 3.6x / 6.4x for float32). Attention reads the dequantized blocks. The paged cache only.",
    )
    kv_group_size: Literal[32, 64, 128] = Field(
        64,
        description="Values per quantization group (one scale and bias each) when kv_bits is 8 or 4; it "
        "must divide the model's K and V head dimensions, or the model does not load.",
    )
    state_interval: int = Field(
        512,
        ge=0,
        description="Hybrid and state-space models: also snapshot a prompt's recurrent state every N "
        "tokens (besides its end and each request's end), so prompts that share a long prefix and then "
        "differ resume from the last snapshot before they differ; 0: at prompt and request ends only. "
        "Rounded up to a multiple of block_size.",
    )
    state_cache_share: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Hybrid and state-space models: the share of the KV budget that snapshots of "
        "recurrent state may take (least recently used first out); the rest holds K/V blocks and the "
        "running sequences' states.",
    )
    batch_check: bool = Field(
        True,
        description="At load, run a warm-up batch of prompts of different lengths and check every row "
        "against the same prompt alone; a model whose batched step is wrong is then served one "
        "request at a time (logged, and in the engine's stats).",
    )
    max_cache_entries: int = Field(64, ge=1, description="Cached prompts kept when memory_aware is False.")
    # vision-language models (engine.vision)
    max_images: int = Field(8, ge=1, le=64, description="Vision models: most images in one request.")
    max_image_pixels: int = Field(
        2**25,
        ge=1,
        description="Vision models: the most pixels (width x height) of one image, read from its "
        "header before it is decoded (the processor then resizes it to the model's size).",
    )
    vision_cache_mb: float = Field(
        64,
        ge=0,
        description="Vision models: the vision encoder's outputs kept by image hash (least recently "
        "used out past this many MB; counted in the model's footprint); 0: none kept.",
    )
    disk_cache: DiskCacheConfig = Field(
        default_factory=DiskCacheConfig,
        description="A prefix cache on disk that outlives the process (paged cache, K/V models only).",
    )
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig,
        description="Speculative decoding (paged cache, K/V models; off by default).",
    )

    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters of this model, each served by its name in the same continuous batch "
        "as the base (our batch loop over the paged cache). Loaded on first use.",
    )
    max_loaded_adapters: int = Field(
        4,
        ge=1,
        le=256,
        description="Most adapters resident at once; past it the least recently used idle one is "
        "evicted, and a request whose adapter finds no idle slot waits.",
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names_unique(cls, v: list[AdapterConfig]) -> list[AdapterConfig]:
        names = [a.name for a in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(repeated)}")
        return v

    @field_validator("tool_prompt")
    @classmethod
    def _tool_prompt_has_tools(cls, v: str | None) -> str | None:
        if v is not None and "{tools}" not in v:
            raise ValueError("must contain {tools}, where the tools' JSON schemas go")
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, v: str | None) -> str | None:
        if v is not None:
            from jinja2 import TemplateSyntaxError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            try:
                ImmutableSandboxedEnvironment().parse(v)
            except TemplateSyntaxError as exc:
                raise ValueError(f"not a valid Jinja template: {exc}") from exc
        return v

    @model_validator(mode="after")
    def _disk_cache_needs_the_paged_cache(self) -> EngineConfig:
        if self.disk_cache.enabled and not self.paged_cache:
            raise ValueError("disk_cache.enabled needs paged_cache: the disk keeps the paged cache's blocks")
        return self

    @model_validator(mode="after")
    def _simple_mode(self) -> EngineConfig:
        if not self.continuous_batching:
            self.max_num_seqs = 1
            self.prefill_batch_size = 1
        self.prefill_batch_size = min(self.prefill_batch_size, self.max_num_seqs)
        return self


Role = Literal["system", "user", "assistant", "tool", "developer"]
