"""Draft-model speculation: a smaller model that shares the target's tokenizer proposes each
drafting row's tokens (engine.speculative verifies them in the target's batch).

The draft model runs on the loop thread beside the target, over a paged cache of its own (a
second `PagedCacheManager`: its own block pool and prefix index, so a system prompt the target
shares, the draft shares too). For the rows that draft in a step it:

1. catches up: feeds each row the tokens its cache lacks (a new row's whole prompt, in chunks of
   `prefill_step_size`; afterwards the one or two tokens the last verify step kept beyond what it
   was fed), as one right-padded chunk whose logits at each row's last real token give its first
   draft;
2. decodes the rest greedily, one batched step per draft token, the whole draft one lazy graph
   and one host sync;
3. after the verify step, cuts each row's draft cache back to the tokens the target kept
   (`accept`).

Drafts are the draft model's argmax: each is one token, so verifying them with the target's own
sampler is the standard rejection sampling (engine.speculative). Its memory: the weights, and a
KV budget holding as many tokens as the target's (`kv_budget_bytes`), both counted in the
model's footprint.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import numpy as np

from .config import DiskCacheConfig, EngineConfig
from .errors import ModelLoadError
from .kv.interface import StepWrites
from .kv.kv_storage import layer_block_bytes
from .kv.layout import probe_layout
from .kv.manager import PagedCacheManager, make_cache_manager

log = logging.getLogger(__name__)


def same_tokenizer(a, b) -> bool:
    """Whether two mlx_lm tokenizers map every token the same way (drafts are token ids)."""
    return a.vocab_size == b.vocab_size and a.get_vocab() == b.get_vocab()


def draft_budget_bytes(draft_model, target_budget: int, target_block_bytes: int, block_size: int) -> int:
    """A KV budget for the draft that holds as many tokens as the target's budget does."""
    layout = probe_layout(draft_model)
    per_token = sum(layer_block_bytes(layout.kv_layers, layout.kv_dtype, block_size)) / block_size
    return max(1 << 20, int(target_budget * per_token / (target_block_bytes / block_size)))


class ModelDrafter:
    """A draft model and its own paged cache; one `DraftRow` per drafting row (on its RowSpec)."""

    def __init__(self, loaded, config: EngineConfig, kv_budget_bytes: int, source: str):
        self.model = loaded.model
        self.source = source
        self.weights_bytes = loaded.weights_bytes
        self.kv_budget_bytes = kv_budget_bytes
        own = config.model_copy(
            update={"cache_memory_mb": max(1, kv_budget_bytes >> 20), "disk_cache": DiskCacheConfig(), "kv_bits": 16}
        )
        self.cache = make_cache_manager(self.model, own)
        if not isinstance(self.cache, PagedCacheManager) or self.cache.batch_kv().recurrent:
            raise ModelLoadError(
                f"speculative.draft_model {source!r}: a draft model must keep plain K/V in the paged cache "
                f"({self.cache.stats().get('why')})"
            )
        self.kv = self.cache.batch_kv()
        self.step = config.prefill_step_size
        self.rows: dict[int, tuple] = {}  # id(RowSpec) -> (spec, its SeqBlocks, tokens fed before the drafts)

    def propose(self, specs: list, k: int) -> list[list[int]]:
        """Up to `k` greedy drafts for each row (none for all when the draft cache is full)."""
        seqs = [self._seq(s) for s in specs]
        todos = [s.tokens[seq.length :] for s, seq in zip(specs, seqs)]
        if not self.cache.can_allocate(StepWrites(prefill=[(seq, len(t) + k) for seq, t in zip(seqs, todos)])):
            return [[] for _ in specs]
        todos = self._prefill(seqs, todos)
        real = [len(t) for t in todos]
        chunk = np.zeros((len(seqs), max(real)), dtype=np.uint32)
        for i, t in enumerate(todos):
            chunk[i, : real[i]] = t
        logits = self.model(mx.array(chunk), cache=self.kv.caches(seqs, chunk=real))
        last = mx.array(np.asarray(real, dtype=np.int32) - 1)[:, None, None]
        token = mx.argmax(mx.take_along_axis(logits, last, axis=1)[:, 0], axis=-1)
        for spec, seq in zip(specs, seqs):
            self.rows[id(spec)] = (spec, seq, seq.length)
        drafts, caches = [token], self.kv.caches(seqs)  # one set of caches: decode keeps working copies
        for _ in range(k - 1):
            token = mx.argmax(self.model(token[:, None], cache=caches)[:, -1], axis=-1)
            drafts.append(token)
        self.kv.flush(caches)
        out = mx.stack(drafts, axis=1)
        mx.eval(out, *self.kv.take_writes())
        return out.tolist()

    def _seq(self, spec):
        row = self.rows.get(id(spec))
        if row is not None:
            return row[1]
        seq, _ = self.cache.acquire(list(spec.tokens), 0)
        self.rows[id(spec)] = (spec, seq, seq.length)
        return seq

    def _prefill(self, seqs: list, todos: list) -> list:
        """Feed the long catch-ups (a new row's prompt) in chunks until every row has at most
        `step` tokens left; those go in the drafting chunk."""
        while max(len(t) for t in todos) > self.step:
            rows = [i for i, t in enumerate(todos) if len(t) > self.step]
            real = [min(self.step, len(todos[i]) - self.step) for i in rows]
            chunk = np.zeros((len(rows), max(real)), dtype=np.uint32)
            for j, (i, n) in enumerate(zip(rows, real)):
                chunk[j, :n] = todos[i][:n]
                todos[i] = todos[i][n:]
            self.model(mx.array(chunk), cache=self.kv.caches([seqs[i] for i in rows], chunk=real))
            mx.eval(*self.kv.take_writes())
        return todos

    def accept(self, spec, kept: int, k: int) -> None:
        """The verify step kept `kept` of the row's drafts: its draft cache keeps what it was fed
        of them (the last draft is never fed)."""
        row = self.rows.get(id(spec))
        if row is not None:
            self.kv.truncate(row[1], row[2] + min(kept, k - 1))

    def drop(self, spec) -> None:
        """The row left the batch: its draft K/V go to the draft's prefix cache."""
        row = self.rows.pop(id(spec), None)
        if row is not None:
            _, seq, _ = row
            self.cache.store(spec.tokens[: seq.length], seq)

    def reset(self) -> None:
        """The loop starts over (a failed step): every row's draft blocks go back."""
        for _, seq, _ in self.rows.values():
            self.cache.release(seq)
        self.rows.clear()

    def stats(self) -> dict:
        cache = self.cache.stats()
        return {
            "draft_model": self.source,
            "draft_kv_budget_bytes": self.kv_budget_bytes,
            **{f"draft_cache_{k}": cache[k] for k in ("blocks_used", "hits", "prefix_hits") if k in cache},
        }


def load_drafter(config: EngineConfig, target, target_cache, load_model) -> ModelDrafter | None:
    """The YAML's draft model, loaded the way the target was, when `speculative.method` is draft."""
    spec = config.speculative
    if spec.method != "draft":
        return None
    if not isinstance(target_cache, PagedCacheManager) or target_cache.batch_kv().recurrent:
        log.warning("speculative decoding is off for this model: it needs our batch loop over plain K/V")
        return None
    loaded = load_model(spec.draft_model, fast_cpu=config.fast_cpu)
    if not same_tokenizer(loaded.tokenizer, target.tokenizer):
        raise ModelLoadError(
            f"speculative.draft_model {spec.draft_model!r} does not share the tokenizer of the model it drafts for"
        )
    pool = target_cache.pool
    budget = draft_budget_bytes(loaded.model, target_cache.budget_bytes, pool.block_bytes, pool.block_size)
    log.info(
        "draft model %s: %.0f MB of weights, %.0f MB of KV", spec.draft_model, loaded.weights_bytes / 1e6, budget / 1e6
    )
    return ModelDrafter(loaded, config, budget, spec.draft_model)
