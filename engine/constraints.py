"""Grammar-constrained decoding: a request's output held to a JSON schema or a grammar.

llguidance (docs/grammar_engines.md says why this engine) compiles a request's `GuidedSpec` into a
matcher over the model's tokenizer. In the batch loop each constrained row keeps its matcher:
before the row's next token is sampled, the loop reads the previous tokens (the matcher consumes
them), computes every constrained row's allowed-token bitmask on the host in one parallel call
while the device runs the step's forward pass, and masks those rows' logits; unconstrained rows
get an all-ones mask, so their logits, and their greedy tokens, are unchanged.

JSON is compiled without free whitespace (`": "` and `", "` as separators): a small model
under a grammar that allows whitespace everywhere tends to emit it until max_tokens.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections import OrderedDict
from typing import Any

import mlx.core as mx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import InvalidRequestError
from .json_layout import JSON_OPTIONS
from .tool_grammar import call_grammar

log = logging.getLogger(__name__)

TEMPLATES = 64  # compiled grammars kept per model (a schema's next request copies its matcher)


class ForcedTool(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    parameters: dict[str, Any] | None = None  # its arguments' JSON schema


class ToolCallsSpec(BaseModel):
    """Forced tool calls: the output is calls of these tools (up to engine.tool_grammar's
    MAX_PARALLEL_CALLS with `parallel`, else one), in the model's own call format."""

    model_config = ConfigDict(extra="forbid")

    tools: list[ForcedTool] = Field(min_length=1)
    parallel: bool = False


class GuidedSpec(BaseModel):
    """What a constrained request's output must match: exactly one of the four."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict[str, Any] | None = None  # OpenAI response_format json_schema
    json_object: bool = False  # OpenAI response_format json_object: any JSON object
    lark: str | None = None  # a Lark grammar (with %json{...} for embedded schemas)
    tool_calls: ToolCallsSpec | None = None  # tool_choice required / a named function

    @model_validator(mode="after")
    def _exactly_one(self):
        given = (self.json_schema is not None, self.json_object, self.lark is not None, self.tool_calls is not None)
        if sum(given) != 1:
            raise ValueError("give exactly one of json_schema, json_object, lark or tool_calls")
        return self

    def grammar(self, tool_format: str = "hermes", special: dict[str, int] | None = None) -> str:
        """llguidance's grammar; forced calls are written in `tool_format` (engine.chat_format),
        their tags that are `special` tokens (text → id) matched as those tokens."""
        import llguidance

        if self.tool_calls is not None:
            tools = [t.model_dump() for t in self.tool_calls.tools]
            lark = call_grammar(tools, self.tool_calls.parallel, tool_format, special)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        if self.lark is not None:
            return llguidance.LLMatcher.grammar_from_lark(self.lark)
        schema = self.json_schema if self.json_schema is not None else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


class Constraint:
    """One request's matcher: consumes its output tokens, says which token may come next."""

    def __init__(self, matcher):
        self.matcher = matcher

    def consume(self, token: int) -> bool:
        """False if the grammar refused it (the mask allowed it, so only a grammar error does that:
        the request then ends, and the log says why)."""
        if self.matcher.consume_token(token):
            return True
        log.warning("a grammar refused token %d: %s", token, self.matcher.get_error())
        return False

    @property
    def stopped(self) -> bool:
        """The grammar is complete and admits nothing more (the request ends here)."""
        return self.matcher.is_stopped()


class Grammars:
    """The llguidance tokenizer of one model (built once, about a second) and its matchers."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_ids)
        self._lltok = None
        self._executor = None
        self._lock = threading.Lock()
        self._templates: OrderedDict[str, Any] = OrderedDict()  # grammar -> a compiled matcher to copy
        self._special: dict[str, int] | None = None

    def _tokenizer(self):
        with self._lock:
            if self._lltok is None:
                import llguidance

                self._lltok = llguidance.LLTokenizer(
                    tokenizer_json(self._hf), n_vocab=self.vocab_size, eos_token=self._eos
                )
                self._executor = llguidance.LLExecutor()
            return self._lltok

    def compile(self, spec: GuidedSpec, tool_format: str = "hermes") -> Constraint:
        """A fresh matcher for one request (forced calls in the model's `tool_format`); a grammar
        or schema that does not compile is a 400 naming the field it came from (a Lark grammar
        or forced calls: `tools`)."""
        import llguidance

        param = "response_format" if spec.lark is None and spec.tool_calls is None else "tools"
        try:
            grammar = spec.grammar(tool_format, self.special_tokens())
        except ValueError as exc:
            raise InvalidRequestError(f"{param}: {exc}", param=param) from exc
        with self._lock:
            template = self._templates.pop(grammar, None)
        if template is None:
            template = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            if template.is_error():
                raise InvalidRequestError(
                    f"{param}: the schema or grammar cannot be enforced: {template.get_error()}", param=param
                )
        with self._lock:  # most recently used last; a request's copy is its own
            self._templates[grammar] = template
            while len(self._templates) > TEMPLATES:
                self._templates.popitem(last=False)
        return Constraint(template.deep_copy())

    def special_tokens(self) -> dict[str, int]:
        """The vocabulary's special tokens (text → id): a grammar matches them only as tokens."""
        if self._special is None:
            added = json.loads(tokenizer_json(self._hf)).get("added_tokens") or []
            self._special = {t["content"]: t["id"] for t in added if t.get("special")}
        return self._special

    def bitmask(self, constraints: list[Constraint | None]) -> np.ndarray:
        """[B, ceil(vocab / 32)] int32 allowed-token bits, all ones for rows without a constraint
        and for rows whose grammar is complete (their token is not used)."""
        import llguidance.numpy as llnp

        self._tokenizer()
        mask = llnp.allocate_token_bitmask(len(constraints), self.vocab_size)
        live = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None and not c.stopped]
        if live:
            llnp.fill_next_token_bitmask_par(self._executor, live, mask)
        return mask


def logits_width(model) -> int:
    """The width of the model's logits (its vocabulary, padding included)."""
    args = getattr(model, "args", None)
    width = getattr(args, "vocab_size", None) or getattr(getattr(args, "text_config", None), "vocab_size", None)
    if isinstance(width, dict):
        width = width.get("vocab_size")
    if not width:
        import mlx.nn as nn

        embeddings = [m for _, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))]
        width = embeddings[0].weight.shape[0]
    return int(width)


class GrammarProcessor:
    """A constraint as an mlx_lm logits processor, for mlx_lm's BatchGenerator (the loop for caches
    we cannot page). Its n-th call samples output token n-1 and gets output token n-2 as the
    step's input (the first gets the prompt's last token); the loop also feeds it each token it
    reads back. Each output token is consumed once, by whichever comes first."""

    def __init__(self, grammars: Grammars, constraint: Constraint):
        self.grammars, self.constraint = grammars, constraint
        self.calls = 0
        self.consumed = 0

    def feed(self, index: int, token: int) -> None:
        if index == self.consumed:
            self.consumed += 1
            self.constraint.consume(token)

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        self.calls += 1
        if self.calls > 1:
            self.feed(self.calls - 2, int(context[-1].item()))
        return apply_bitmask(logits, self.grammars.bitmask([self.constraint]))


def tokenizer_json(tokenizer) -> str:
    """The Rust tokenizer's JSON (added tokens included), without padding or truncation, from
    mlx_lm's TokenizerWrapper, a transformers tokenizer, or the Rust one itself."""
    import tokenizers

    for _ in range(3):
        if isinstance(tokenizer, tokenizers.Tokenizer):
            backend = copy.copy(tokenizer)
            backend.no_padding()
            backend.no_truncation()
            return backend.to_str()
        inner = getattr(tokenizer, "backend_tokenizer", None)
        tokenizer = inner if inner is not None else getattr(tokenizer, "_tokenizer", None)
    raise ValueError("structured output needs a fast (Rust) tokenizer")


def _masked(logits: mx.array, words: mx.array) -> mx.array:
    bits = mx.arange(32, dtype=mx.uint32)
    allowed = ((words[:, :, None] >> bits) & 1).reshape(words.shape[0], -1)[:, : logits.shape[-1]]
    return mx.where(allowed.astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))


_masked_compiled = mx.compile(_masked)  # fused, faster than eager (docs/grammar_engines.md)


def apply_bitmask(logits: mx.array, bitmask: np.ndarray) -> mx.array:
    """Logits [B, V] with the tokens a [B, ceil(V/32)] bitmask leaves out set to -inf. Plain
    MLX ops, so it runs on every backend (llguidance's own helper is a Metal kernel)."""
    return _masked_compiled(logits, mx.array(bitmask.view(np.uint32)))


def schema_text(schema: dict) -> str:
    """A schema as compact JSON (for prompts and error messages)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
