"""`EmbeddingEngine`: texts or token ids → one vector each, from a sentence-transformers-style
BERT model in MLX.

    engine = EmbeddingEngine.from_source("all-minilm-l6-v2")
    result = engine.embed(["A man is eating food.", "A man is riding a horse."])
    result.vectors  # float32 [2, 384], unit length; result.prompt_tokens: the tokens read

The pipeline is sentence-transformers' own (modules.json): the encoder's last hidden states,
pooled as 1_Pooling/config.json says (mean over the real tokens, the [CLS] token or the max),
then L2-normalized where the model lists a Normalize module (a directory without modules.json:
mean pooling, normalized). Inputs are tokenized with the model's tokenizer.json ([CLS] ... [SEP]);
token-id inputs are the encoder's input as is. The context is sentence_bert_config.json's
`max_seq_length` (what the model was trained with), else `max_position_embeddings`: a longer
input is refused unless the call asks for truncation (then its first tokens are kept, its
closing special token too for text). Inputs are encoded in batches of at most `max_batch_size`
rows, sorted by length so that rows of a batch pad little; a row attends only to its own
tokens, so its vector does not depend on the batch.

One call at a time runs the model (a lock); `embed` may be called from any thread. On the CPU
fast path OpenBLAS's threads follow what else runs, as in the chat engine (engine.cpu_threads).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..cpu_threads import BlasThreads
from ..errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from ..loading import cpu_fast_path
from ..loading.embedding_source import embedding_model_dir
from ..memory import Footprint, safetensors_params
from .bert import ACTIVATIONS, Bert, BertArgs

log = logging.getLogger(__name__)

POOLING_MODES = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}
WARMUP_TOKENS = 16  # per row of the warm-up batch that measures working memory


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: np.ndarray  # float32 [inputs, dimensions], in input order
    prompt_tokens: int  # tokens read, special tokens included, after any truncation
    truncated: int = 0  # inputs that were cut to the context
    input_tokens: tuple[int, ...] = ()  # tokens read per input, in input order (they sum to prompt_tokens)


@dataclass(frozen=True)
class EmbeddingModelInfo:
    path: Path
    model_type: str
    dimension: int
    context_length: int
    pooling: str
    normalize: bool


class EmbeddingEngine:
    def __init__(
        self,
        model: Bert,
        tokenizer,
        info: EmbeddingModelInfo,
        max_batch_size: int = 32,
        adaptive_cpu_threads: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self.info = info
        self.max_batch_size = max_batch_size
        self.tokenizer = tokenizer
        self._truncating = _truncating_copy(tokenizer, info.context_length)
        self._pad_id = _pad_id(tokenizer)
        self._vocab_size = model.args.vocab_size
        self._lock = threading.Lock()
        self._blas = BlasThreads.for_this_process() if adaptive_cpu_threads else None
        self.weights_bytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
        self.footprint: Footprint | None = None

    @classmethod
    def from_source(
        cls, source: str, *, cache_dir: str | Path | None = None, max_batch_size: int = 32, measure: bool = True
    ) -> EmbeddingEngine:
        from ..loading.loader import default_cache_dir

        start = time.perf_counter()
        path = embedding_model_dir(source, Path(cache_dir) if cache_dir else default_cache_dir())
        model, tokenizer, info = load_embedding_model(path)
        engine = cls(model, tokenizer, info, max_batch_size=max_batch_size)
        if measure:
            engine.measure_footprint()
        log.info(
            "loaded embedding model %s (%s, %d dims, context %d) in %.2fs",
            source, info.model_type, info.dimension, info.context_length, time.perf_counter() - start,
        )  # fmt: skip
        return engine

    def embed(
        self, inputs: list[str] | list[list[int]], *, truncate: bool = False, dimensions: int | None = None
    ) -> EmbeddingResult:
        """One vector per input, in order. `dimensions` keeps the first components (renormalized
        when the model normalizes): meaningful for Matryoshka-trained models, a plain cut
        otherwise. Raises InvalidRequestError (param `input` or `dimensions`) before any work for
        an empty, ill-typed or too long input."""
        self._check_dimensions(dimensions)
        rows, truncated = self._tokenize(inputs, truncate)
        with self._lock:
            vectors = self._encode(rows)
        if dimensions is not None and dimensions < vectors.shape[1]:
            vectors = vectors[:, :dimensions]
            if self.info.normalize:
                vectors = _l2_normalize(vectors)
        lengths = tuple(len(r) for r in rows)
        return EmbeddingResult(np.ascontiguousarray(vectors), sum(lengths), truncated, lengths)

    # -- inputs ------------------------------------------------------------------------------

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if type(dimensions) is not int or not 1 <= dimensions <= self.info.dimension:
            raise InvalidRequestError(
                f"dimensions must be an integer from 1 to {self.info.dimension} for this model, got {dimensions!r}",
                param="dimensions",
            )

    def _tokenize(self, inputs, truncate: bool) -> tuple[list[list[int]], int]:
        if not isinstance(inputs, list) or not inputs:
            raise InvalidRequestError("input must be a non-empty list of strings or of token-id lists", param="input")
        if all(isinstance(x, str) for x in inputs):
            rows = [e.ids for e in self.tokenizer.encode_batch(inputs)]
        elif all(isinstance(x, list) for x in inputs):
            rows = [self._check_ids(i, ids) for i, ids in enumerate(inputs)]
        else:
            raise InvalidRequestError("input must be all strings or all token-id lists, not a mix", param="input")
        limit, truncated = self.info.context_length, 0
        for i, ids in enumerate(rows):
            if not ids:
                raise InvalidRequestError(f"input[{i}] is empty", param="input")
            if len(ids) <= limit:
                continue
            if not truncate:
                raise InvalidRequestError(
                    f"input[{i}] has {len(ids)} tokens, more than this model's context of {limit}; "
                    "shorten it or ask for truncation",
                    param="input",
                    code="context_length_exceeded",
                )
            rows[i] = self._truncating.encode(inputs[i]).ids if isinstance(inputs[i], str) else ids[:limit]
            truncated += 1
        return rows, truncated

    def _check_ids(self, i: int, ids: list) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self._vocab_size for t in ids):
            raise InvalidRequestError(
                f"input[{i}] must be a list of token ids from 0 to {self._vocab_size - 1}", param="input"
            )
        return list(ids)

    # -- the model -----------------------------------------------------------------------------

    def _encode(self, rows: list[list[int]]) -> np.ndarray:
        out = np.empty((len(rows), self.info.dimension), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.max_batch_size):
            if self._blas is not None:
                self._blas.tick()  # between batches: no GEMM in flight
            batch = order[start : start + self.max_batch_size]
            out[batch] = self._encode_batch([rows[i] for i in batch])
        return out

    def _encode_batch(self, rows: list[list[int]]) -> np.ndarray:
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self._pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        pooled = self._pool(self.model(mx.array(ids), mx.array(mask)), mx.array(mask))
        if self.info.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return np.array(pooled.astype(mx.float32))

    def _pool(self, hidden: mx.array, mask: mx.array) -> mx.array:
        if self.info.pooling == "cls":
            return hidden[:, 0]
        weights = mask[..., None].astype(hidden.dtype)
        if self.info.pooling == "max":
            return mx.where(weights > 0, hidden, mx.finfo(hidden.dtype).min).max(axis=1)
        return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)

    def measure_footprint(self) -> Footprint:
        """Weights + the working memory of a full batch at the full context, measured as the peak
        of a warm-up batch (`max_batch_size` rows of WARMUP_TOKENS) scaled to the context, plus
        one layer's attention scores at the full context. No KV cache: `kv` is 0."""
        rows, context = self.max_batch_size, self.info.context_length
        warm = min(WARMUP_TOKENS, context)
        ids = mx.zeros((rows, warm), dtype=mx.int32)
        mask = mx.ones((rows, warm), dtype=mx.int32)
        with self._lock:
            mx.eval(ids, mask)
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(self._pool(self.model(ids, mask), mask))
            peak = max(0, mx.get_peak_memory() - base)
            mx.clear_cache()
        scores = rows * self.model.args.num_attention_heads * context**2 * 4
        self.footprint = Footprint(self.weights_bytes, 0, int(peak * context / warm) + scores, measured=True)
        return self.footprint

    def stats(self) -> dict:
        info = self.info
        return {
            "kind": "embedding",
            "model_type": info.model_type,
            "dimension": info.dimension,
            "context_length": info.context_length,
            "pooling": info.pooling,
            "normalize": info.normalize,
            "max_batch_size": self.max_batch_size,
            "cpu_threads": self._blas.threads if self._blas is not None else None,
            "footprint": self.footprint.to_dict() if self.footprint else None,
        }


def estimate_footprint(source: str, *, cache_dir: str | Path | None = None, max_batch_size: int = 32) -> Footprint:
    """The footprint before the model was ever loaded, from its files alone (the bundled zip is
    unzipped first): float32 weights on a CPU-only MLX (else as stored), and a full batch at the
    full context: per token, the FFN's activations (4 x intermediate) and the layer's hidden-size
    tensors (8 x hidden), float32; plus one layer's attention scores."""
    from ..loading.loader import default_cache_dir

    path = embedding_model_dir(source, Path(cache_dir) if cache_dir else default_cache_dir())
    files = sorted(path.glob("*.safetensors"))
    if cpu_fast_path.wants_fast_path():
        weights = 4 * sum(safetensors_params(f, None) for f in files)
    else:
        weights = sum(f.stat().st_size for f in files)
    args = BertArgs.from_config(_read_json(path / "config.json"))
    context = _context_length(path, args)
    per_token = (4 * args.intermediate_size + 8 * args.hidden_size) * 4
    scores = max_batch_size * args.num_attention_heads * context**2 * 4
    return Footprint(weights, 0, max_batch_size * context * per_token + scores)


def load_embedding_model(path: Path) -> tuple[Bert, object, EmbeddingModelInfo]:
    """The encoder (float32 on a CPU-only MLX), its tokenizer and how it pools, from a directory."""
    from tokenizers import Tokenizer

    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type != "bert":
        raise UnsupportedModelError(f"{path}: embedding model_type {model_type!r} is not supported (bert is)")
    args = BertArgs.from_config(config)
    if args.position_embedding_type != "absolute" or args.hidden_act not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{path}: position_embedding_type {args.position_embedding_type!r} / hidden_act {args.hidden_act!r} "
            f"not supported (absolute; {', '.join(ACTIVATIONS)})"
        )
    model = Bert(args)
    weights: dict = {}
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    try:
        model.load_weights(list(Bert.sanitize(weights).items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(f"{path}: the weights do not fit a BERT of this config: {exc}") from exc
    if cpu_fast_path.wants_fast_path():
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    model.eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    pooling, normalize = _pooling(path, args.hidden_size)
    info = EmbeddingModelInfo(
        path=path,
        model_type=model_type,
        dimension=args.hidden_size,
        context_length=_context_length(path, args),
        pooling=pooling,
        normalize=normalize,
    )
    return model, tokenizer, info


def _context_length(path: Path, args: BertArgs) -> int:
    """What the model was trained with (sentence_bert_config.json), within its position table."""
    trained = _read_json(path / "sentence_bert_config.json").get("max_seq_length")
    return min(int(trained or args.max_position_embeddings), args.max_position_embeddings)


def _pooling(path: Path, hidden: int) -> tuple[str, bool]:
    """(pooling mode, normalize) from modules.json and the pooling module's config."""
    modules = _read_json(path / "modules.json") or []
    if not modules:
        return "mean", True
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    known = {"Transformer", "Pooling", "Normalize"}
    if set(types) - known:
        raise UnsupportedModelError(f"{path}: sentence-transformers modules {sorted(set(types) - known)} not supported")
    pooling_dir = next((m.get("path", "") for m, t in zip(modules, types, strict=True) if t == "Pooling"), None)
    mode = "mean"
    if pooling_dir is not None:
        config = _read_json(path / pooling_dir / "config.json")
        modes = [mode for mode, key in POOLING_MODES.items() if config.get(key)]
        others = [
            k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in POOLING_MODES.values()
        ]
        if len(modes) != 1 or others:
            raise UnsupportedModelError(f"{path}: pooling {config} not supported (one of {', '.join(POOLING_MODES)})")
        mode = modes[0]
        if config.get("word_embedding_dimension", hidden) != hidden:
            raise UnsupportedModelError(f"{path}: the pooling module's dimension differs from the encoder's")
    return mode, "Normalize" in types


def _truncating_copy(tokenizer, limit: int):
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.enable_truncation(max_length=limit)
    return copy


def _pad_id(tokenizer) -> int:
    pad = tokenizer.token_to_id("[PAD]")
    return 0 if pad is None else pad


def _read_json(path: Path) -> dict | list:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON: {exc}") from exc


def _l2_normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
