"""Our continuous-batching loop over an mlx_lm model and the paged KV cache.

Each `step()` issues, without waiting for the device:
- one prefill chunk (up to `prefill_step_size` tokens of each waiting prompt, right-padded; as
  many prompts as fit in `prefill_batch_size` x `prefill_step_size` token slots): the prompt but
  its last token, whose K/V go to the pool; the last token is the row's input to its first
  decode step, which samples its first output token. The chunk is handed to the device at once,
  so it runs while the host builds the decode step;
- one decode step of the running batch, with the rows whose prompt that chunk finished: a
  prompt's first token comes from the step that computed the rest of it. Its input tokens are
  the previous step's sampled tokens, still on the device (a lazy array), so the step is
  enqueued before those are read.

Then it reads the previous step's tokens (the one host sync of the step) and reports them. A
row that finished there (a stop token) was already in the step just issued: that one token of
work is wasted, its output dropped, and the row leaves the batch at the next step. A row that
reaches `max_tokens` is known on the host and is never issued past it.

That pipelining pays on a GPU, where the host builds step k+1 while the device runs step k. On
the CPU it costs a step of latency on every token: there the device is the host's own cores,
and `mx.async_eval` returns only once all but a few of the step's ops have run, so step k's
tokens would come out when step k+1 is nearly done. With `pipelined=False` (the default on the
CPU) a step reads its own tokens right after issuing them.

A decode step through working copies is one compiled function (engine.compiled_step), except on CUDA
while no row is padded: that step needs no mask and runs eagerly, so attention gets MLX's fused
kernel (`compiled_step.eager_unpadded`). A step that gathers, and every prefill chunk, is the
model's own call. Sampling is one graph for the whole batch (engine.batch_sampling). The K/V live in
the block pool, which the loop reaches only through its `BatchKV` (engine.kv.interface): the
model gets one cache per layer over the rows' blocks (`caches`), made again only when the batch
changes (they keep the decode working copies between steps), or for a prompt chunk; `flush`
before anything else reads the rows' blocks; `take_writes` to evaluate with the step. The loop
never counts blocks: it tells the scheduler what the next step writes (`next_writes`), and the
cache manager decides whether that fits.
"""

from __future__ import annotations

import itertools
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .batch_sampling import BatchSampling, needs_counts, row_key
from .compiled_step import CompiledDecode, eager_unpadded
from .constraints import Grammars, apply_bitmask
from .kv.interface import BatchKV, StepWrites
from .kv.paged_cache import BatchCaches, SeqBlocks
from .loop import Token
from .lora import LoRATable
from .speculative import PIPELINED_MARGIN, RowSpec, Speculator, expand, kept
from .thinking import force_tokens
from .vision.prompt import merged_embeddings

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import SpeculativeConfig
    from .draft_model import ModelDrafter
    from .request import Request


@dataclass(eq=False)
class Row:
    """A request's place in the loop: what the loop tracks of it between inserts."""

    request: Request
    blocks: SeqBlocks  # the request's blocks (`request.blocks` at insert)
    todo: list[int]  # prompt tokens not prefilled yet (the last one is the first decode input)
    max_tokens: int  # output tokens this insert may produce (the request's remaining ones)
    stops: frozenset[int]
    key: np.ndarray
    history: list[int] | None  # prompt + output so far, kept only for penalties
    start: int = 0  # output tokens before this insert (a preempted request resumes): seeds' positions
    pos: int = 0  # the position of todo[0] in the request's tokens
    issued: int = 0  # output tokens computed or in flight
    produced: int = 0  # output tokens read back
    done: bool = False
    spec: RowSpec | None = None  # its tokens and drafting record, when the loop speculates

    @property
    def top_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k best."""
        params = self.request.params
        return params.top_logprobs if params.logprobs else None


@dataclass
class _Issued:
    """One decode step in flight."""

    rows: list[Row]
    tokens: mx.array  # [B] sampled, maybe not evaluated yet
    logprobs: tuple[mx.array, mx.array, mx.array] | None = None  # chosen [B], top ids / values [B, k]

    def arrays(self) -> list[mx.array]:
        return [self.tokens, *(self.logprobs or ())]


@dataclass
class _Batch:
    """The decode batch: its rows, their caches and sampling arrays, and its next inputs."""

    rows: list[Row] = field(default_factory=list)
    caches: BatchCaches | None = None
    sampling: BatchSampling | None = None
    inputs: mx.array | None = None  # [B] next input token per row (device)
    positions: mx.array | None = None  # [B] index of the token each row samples next (device)
    constrained: bool = False  # some row has a grammar: the step reads the previous tokens first
    capped: bool = False  # some row has a thinking cap (engine.thinking): the same
    top_logprobs: int | None = None  # the most any row asks for (None: no row asks)
    lora: mx.array | None = None  # [B] each row's adapter slot (engine.lora); None: no row has one


def batch_rows_history(row: Row) -> list[int]:
    """The tokens a row's penalties count before its next input (the step adds that one). The
    input is the row's newest token. The host history has it once it was read back: a row that
    just joined (its last prompt token), and every row of an unpipelined loop; a pipelined loop
    has not read a running row's input yet (it is in flight)."""
    if row.history is None:
        return []
    return row.history[:-1] if row.produced == row.issued else row.history


class BatchLoop:
    """Continuous batching over the paged cache: `insert` rows, `step()` for their tokens."""

    def __init__(
        self,
        model,
        kv: BatchKV,
        *,
        max_num_seqs: int,
        prefill_batch_size: int,
        prefill_step_size: int,
        grammars: Grammars | None = None,
        compiled: bool = True,
        pipelined: bool | None = None,
        column_write: str | None = None,
        unpadded: str | None = None,
        embed=None,
        speculative: SpeculativeConfig | None = None,
        drafter: ModelDrafter | None = None,
        room: Callable[[StepWrites], bool] | None = None,
        lora: LoRATable | None = None,
    ):
        self.model = model
        # LoRA adapters (engine.adapters): every forward call (prefill chunk, decode, verify) gets
        # its rows' slots; a call where no row has an adapter runs the base alone
        self.lora = lora
        self.embed = embed  # a vision model's token embedding table: image rows prefill from embeddings
        self.pipelined = mx.default_device() != mx.cpu if pipelined is None else pipelined
        # Speculative decoding (engine.speculative): drafts need each row's tokens on the host, so a
        # pipelined loop reads its step in flight first when a row would draft (a draft model's loop
        # runs unpipelined); `room` says whether a verify step's extra writes fit the budget.
        if speculative is not None and speculative.method == "draft" and drafter is None:
            speculative = None  # no draft model loaded (a load-time check's loop): plain decoding
        self.spec = Speculator(speculative, drafter) if speculative is not None and speculative.method else None
        self.room = room
        if self.spec is not None and self.spec.drafter is not None:
            self.pipelined = False
        if self.spec is not None and self.pipelined:
            self.spec.costs.margin = PIPELINED_MARGIN
        self._after_verify: tuple[tuple[int, int], float, float] | None = None  # the last verify step's (_timed_step)
        self._verify_shape = (0, 0)
        self._cleared = False  # the cost rule took this step's verify before the read ahead (may_verify)
        self.compiled = CompiledDecode(model, column_write, kv.grouped_mask, kv.quant, lora) if compiled else None
        self.eager_unpadded = eager_unpadded(unpadded)
        self.grammars = grammars
        self.kv = kv
        kv.pipelined = self.pipelined
        self.max_num_seqs = max_num_seqs
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.prefilling: list[Row] = []
        self.joining: list[Row] = []  # prefilled, to enter the decode batch at the next step
        self.batch = _Batch()
        self.rows: dict[str, Row] = {}  # request id -> row
        self._issued: _Issued | None = None
        self.peak_batch = 0  # most rows decoding at once

    # --- rows in and out ----------------------------------------------------------------

    def insert(self, request: Request, tokens: list[int], cached: int, stop_ids: list[int]) -> None:
        """A request whose blocks (`request.blocks`, from the cache manager) hold `tokens[:cached]`;
        at least the last token is left to compute. Its grammar has consumed its output so far."""
        if cached >= len(tokens):
            raise ValueError("a row needs at least one prompt token to compute")
        params = request.params
        todo = tokens[cached:]
        row = Row(
            request,
            request.blocks,
            list(todo),
            request.remaining,
            frozenset(stop_ids),
            row_key(params),
            list(tokens) if needs_counts(params) else None,
            len(request.output_ids),
            pos=cached,
        )
        if self.spec is not None:
            row.spec = self.spec.start(tokens)
        self.rows[request.request_id] = row
        (self.prefilling if len(todo) > 1 else self.joining).append(row)

    def remove(self, request: Request) -> None:
        row = self.rows.pop(request.request_id, None)
        if row is not None:
            self._flush()  # its blocks go back to the cache manager next
            row.done = True
            if self.spec is not None:
                self.spec.drop(row.spec)
            if row in self.prefilling:
                self.prefilling.remove(row)
            if row in self.joining:
                self.joining.remove(row)

    def has_work(self) -> bool:
        return bool(self.rows) or self._issued is not None

    # --- one step -----------------------------------------------------------------------

    def step(self) -> list[Token]:
        """Issue the next decode step and prefill chunk, then report the previous step's tokens
        (unpipelined: this step's). A speculating loop verifies drafts instead when rows have some."""
        if self.spec is not None:
            return self._timed_step()
        return self._plain_step()

    def _plain_step(self) -> list[Token]:
        if self._issue_prefill():  # the device starts the chunk while the host builds the decode step
            mx.async_eval(*self.kv.take_writes())
        issued, out = self._issue_decode()  # rows whose prompt the chunk finished decode in it
        if issued is not None:  # the tokens, and the K/V writes into the pool
            mx.async_eval(*issued.arrays(), *self.kv.take_writes())
        if not self.pipelined:
            return out + self._read(issued) if issued is not None else out
        previous, self._issued = self._issued, issued
        return out + self._read(previous) if previous is not None else out

    def _issue_decode(self) -> tuple[_Issued | None, list[Token]]:
        """The next decode step (None without rows), and the previous step's tokens when a
        grammar needed them before this step's sampling."""
        batch = self.batch
        self._update_batch()
        if not batch.rows:
            return None, []
        self.peak_batch = max(self.peak_batch, len(batch.rows))
        inputs = batch.inputs
        logits = self._decode_logits(batch)
        read: list[Token] = []
        if batch.constrained or batch.capped:  # the host computes masks while the device runs the forward pass
            mx.async_eval(logits)
            previous, self._issued = self._issued, None
            read = self._read(previous) if previous is not None else []
            if batch.constrained:
                logits = apply_bitmask(logits, self.grammars.bitmask([r.request.constraint for r in batch.rows]))
            if batch.capped:
                logits = force_tokens(logits, [r.request.cap.forced() if r.request.cap else None for r in batch.rows])
        tokens, logprobs = batch.sampling.sample(logits, inputs, batch.positions, batch.top_logprobs)
        for r in batch.rows:
            r.issued += 1
        batch.inputs, batch.positions = tokens, batch.positions + 1
        return _Issued(list(batch.rows), tokens, logprobs), read

    def _update_batch(self) -> None:
        """Rows that finished leave the decode batch and prefilled ones join it (up to `max_num_seqs`)."""
        batch = self.batch
        keep = [i for i, r in enumerate(batch.rows) if not r.done and r.issued < r.max_tokens]
        room = self.max_num_seqs - len(keep)
        joining, self.joining = self.joining[:room], self.joining[room:]
        if len(keep) != len(batch.rows) or joining:
            self._rebatch(keep, joining)

    def _decode_logits(self, batch: _Batch) -> mx.array:
        """[B, vocab]: the compiled step when the batch decodes through working copies, else the
        model's own call (through the caches, which gather, or append to the copies and mask only
        what is padded: `eager_unpadded`)."""
        copies = self.kv.decode_copies(batch.caches) if self.compiled is not None else None
        geom = self.kv.geometry
        if copies is None or (self.eager_unpadded and geom.sees_all(None)):
            with self._applied(batch.lora):
                return self.model(batch.inputs[:, None], cache=batch.caches)[:, -1, :]
        logits, ks, vs, *columns = self.compiled(
            batch.inputs, geom.col - 1, geom.pad_array, [c.k for c in copies], [c.v for c in copies], batch.lora
        )
        self.kv.commit_column(batch.caches, ks, vs, *columns)
        return logits

    def _rebatch(self, keep: list[int], joining: list[Row]) -> None:
        """The batch changed: new caches and sampling arrays; inputs filtered and extended."""
        batch = self.batch
        self._flush()
        parts = []
        if keep:
            parts.append(batch.inputs if len(keep) == len(batch.rows) else batch.inputs[mx.array(keep)])
        if joining:
            parts.append(mx.array([r.todo[-1] for r in joining], dtype=mx.uint32))
            for r in joining:
                r.todo = []
        rows = [batch.rows[i] for i in keep] + joining
        batch.rows = rows
        if not rows:
            batch.caches = batch.sampling = batch.inputs = batch.positions = batch.lora = None
            batch.constrained, batch.capped, batch.top_logprobs = False, False, None
            return
        batch.inputs = mx.concatenate([p.astype(mx.uint32) for p in parts]) if len(parts) > 1 else parts[0]
        batch.caches = self.kv.caches([r.blocks for r in rows])
        batch.lora = self._slots(rows)
        histories = None
        if any(r.history is not None for r in rows):  # what each row has seen before its next input
            histories = [batch_rows_history(r) for r in rows]
        batch.sampling = BatchSampling.build([r.request.params for r in rows], [r.key for r in rows], histories)
        batch.constrained = any(r.request.constraint is not None for r in rows)
        batch.capped = any(r.request.cap is not None for r in rows)
        asks = [r.top_logprobs for r in rows if r.top_logprobs is not None]
        batch.top_logprobs = max(asks) if asks else None
        batch.positions = mx.array(np.fromiter((r.start + r.issued for r in rows), np.uint32, len(rows)))

    def _issue_prefill(self) -> bool:
        """One chunk of the waiting prompts (all but their last token), if any wait."""
        rows = self._prefill_rows()
        if not rows:
            return False
        self._flush()  # the chunk may reuse a block a decoding row has just filled
        n, real = self._chunk(rows)
        chunk = np.zeros((len(rows), n), dtype=np.uint32)
        starts = [r.pos for r in rows]
        for i, (r, k) in enumerate(zip(rows, real)):
            chunk[i, :k] = r.todo[:k]
            r.todo, r.pos = r.todo[k:], r.pos + k
        caches = self.kv.caches([r.blocks for r in rows], chunk=real)
        inputs = mx.array(chunk)
        with self._applied(self._slots(rows)):
            if self.embed is not None and any(r.request.vision is not None for r in rows):  # image rows: features
                vision = [(r.request.vision, p, k) for r, p, k in zip(rows, starts, real)]
                self.model(inputs, cache=caches, input_embeddings=merged_embeddings(self.embed, inputs, vision))
            else:
                self.model(inputs, cache=caches)  # the logits are never evaluated: only the cache writes
        self.kv.flush(caches)  # a recurrent model's rows take their state back (and may snapshot it)
        for r in rows:
            if len(r.todo) == 1:
                self.prefilling.remove(r)
                self.joining.append(r)
        return True

    def _prefill_rows(self) -> list[Row]:
        """The waiting prompts the next chunk takes, in arrival order: as many as fit in
        `prefill_batch_size` x `prefill_step_size` token slots, padding counted (the chunk shape
        whose working memory the engine measured), so short prompts join many at once; at least one."""
        budget = self.prefill_batch_size * self.prefill_step_size
        rows: list[Row] = []
        width = 0
        for r in self.prefilling:
            wider = max(width, min(self.prefill_step_size, len(r.todo) - 1))
            if rows and wider * (len(rows) + 1) > budget:
                break
            rows.append(r)
            width = wider
        return rows

    def _chunk(self, rows: list[Row]) -> tuple[int, list[int]]:
        """The next prompt chunk's width and each row's real tokens in it. A recurrent model's
        chunk is never padded (engine.kv.recurrent): every row computes the same number of
        tokens, ending at the nearest snapshot point the cache asks for."""
        if not self.kv.recurrent:
            n = min(self.prefill_step_size, max(len(r.todo) - 1 for r in rows))
            return n, [min(n, len(r.todo) - 1) for r in rows]
        n = self.prefill_step_size
        for r in rows:
            n = min(n, len(r.todo) - 1, self.kv.chunk_limit(r.blocks) or n)
        return n, [n] * len(rows)

    def next_writes(self) -> StepWrites:
        """What the next step writes: the next prompt chunk, and a token for each decoding row
        that goes on, the rows whose prompt that chunk finishes among them."""
        rows = self._prefill_rows()
        real = self._chunk(rows)[1] if rows else []
        finishing = [r for r, k in zip(rows, real) if k == len(r.todo) - 1]
        decode = [
            r.blocks
            for r in itertools.chain(self.batch.rows, self.joining, finishing)
            if not r.done and r.issued < r.max_tokens
        ]
        return StepWrites(decode, [(r.blocks, k) for r, k in zip(rows, real)])

    def _slots(self, rows: list[Row]) -> mx.array | None:
        """The rows' adapter slots for a forward call; None when no row has an adapter."""
        return None if self.lora is None else LoRATable.slot_array([r.request.lora_slot for r in rows])

    def _applied(self, slots: mx.array | None):
        return self.lora.applied(slots) if self.lora is not None else nullcontext()

    def _flush(self) -> None:
        """Decode tokens held only in working copies go to the rows' blocks."""
        if self.batch.caches:
            self.kv.flush(self.batch.caches)

    def _read(self, issued: _Issued) -> list[Token]:
        """The host sync: one step's tokens, with their finish reasons (and logprobs if asked)."""
        out = []
        lps = tuple(a.tolist() for a in issued.logprobs) if issued.logprobs is not None else None
        for i, (row, token) in enumerate(zip(issued.rows, issued.tokens.tolist())):
            if row.done:  # removed, or finished in an earlier step: this token was spare work
                continue
            out.append(self._emit(row, token, lps, i))
        if any(t.finish for t in out):
            self._flush()  # the finished rows' blocks go to the prefix cache next
        return out

    def _emit(self, row: Row, token: int, lps: tuple | None, i: int) -> Token:
        """One output token of a row read back: its finish reason (a stop token, `max_tokens`, its
        grammar's end), and its logprobs from entry `i` of the step's (chosen, top ids, top values)."""
        if row.history is not None:
            row.history.append(token)
        if row.spec is not None:
            row.spec.extend([token])
        row.produced += 1
        if row.request.cap is not None:
            row.request.cap.consume(token)
        finish = "stop" if token in row.stops else "length" if row.produced >= row.max_tokens else None
        constraint = row.request.constraint
        if constraint is not None and finish is None:
            finish = "stop" if not constraint.consume(token) or constraint.stopped else None
        if finish is not None:
            row.done = True
            self.rows.pop(row.request.request_id, None)
            if self.spec is not None:
                self.spec.drop(row.spec)
        t = Token(row.request.request_id, token, finish)
        if row.top_logprobs is not None:
            chosen, top_ids, top_lps = lps
            k = row.top_logprobs
            t.logprob, t.top = chosen[i], list(zip(top_ids[i][:k], top_lps[i][:k]))
        return t

    # --- speculative decoding (engine.speculative) --------------------------------------

    def _timed_step(self) -> list[Token]:
        """A speculating loop's step, a verify step or a plain one, timed for `StepCosts` when it
        ran no prompt chunk. A verify step and the plain step after it yield the verify's tokens
        and one plain step's (a pipelined loop's step in flight, read before verifying; else the
        next step's own, which rebuilds the decode working copies): the verify step costs the two
        less a plain step, and no less than its own call after that read. Followed by a verify
        step, it costs its own call."""
        start, waiting = time.perf_counter(), bool(self.prefilling)
        out = self._read_for_drafts()
        drained = time.perf_counter()
        verified = self._speculate() if self._issued is None else None
        out += verified if verified is not None else self._plain_step()
        end, costs, rows = time.perf_counter(), self.spec.costs, len(self.batch.rows)
        after, self._after_verify = self._after_verify, None
        if waiting or not rows:
            return out
        if after is not None:  # ((rows, width), its call's seconds, from after the read) of the verify step before
            shape, whole, own = after
            plain = costs.predict(rows) if verified is None else None
            costs.observe_verify(*shape, own if plain is None else max(own, whole + end - start - plain))
        if verified is not None:
            self._after_verify = (self._verify_shape, end - start, end - drained)
        elif after is None:
            costs.observe_plain(rows, end - start)
        return out

    def _read_for_drafts(self) -> list[Token]:
        """Pipelined, with a step in flight: its tokens, read now when a verify step may come
        (a row would draft on the tokens the host has, and the cost rule would take the step: a
        verify step needs every row's last token, and a read it would refuse costs the overlap);
        else the pauses run down and the loop stays pipelined."""
        if self._issued is None or not self._verifiable():
            return []
        rows = self.batch.rows
        specs = [r.spec for r in rows]
        if self.spec.may_verify(specs, [r.max_tokens - r.issued - 1 for r in rows]):
            previous, self._issued = self._issued, None
            self._cleared = True
            return self._read(previous)
        self.spec.tick(specs)
        return []

    def _verifiable(self) -> bool:
        """Whether the batch may verify drafts: masks (grammars, caps) and penalties are per token."""
        batch = self.batch
        return bool(batch.rows) and not (batch.constrained or batch.capped or batch.sampling.penalties is not None)

    def _speculate(self) -> list[Token] | None:
        """A verify step when rows have drafts and their writes fit; None: a plain step instead. The
        cost rule is asked once a step: not again when the read ahead was for a step it took."""
        cleared, self._cleared = self._cleared, False  # asking again would undo its EXPLORE take
        self._update_batch()
        batch = self.batch
        if not self._verifiable():
            return None
        specs = [r.spec for r in batch.rows]
        drafts = self.spec.drafts(specs, [r.max_tokens - r.issued - 1 for r in batch.rows])
        if not any(drafts):
            return None
        if not cleared and not self.spec.worth(specs, drafts):
            self.spec.unused(specs)
            return None
        if self.room is not None:
            writes = self.next_writes()
            extra = [(r.blocks, len(d)) for r, d in zip(batch.rows, drafts) if d]
            if not self.room(StepWrites(writes.decode, writes.prefill + extra)):
                self.spec.unused(specs)
                return None
        return self._verify(drafts)

    def _verify(self, drafts: list[list[int]]) -> list[Token]:
        """One forward pass over each row's input and drafts (a right-padded chunk), the batch's
        sampler at every position, and each row's longest agreeing prefix kept (its K/V beyond
        cut back). The prefill chunk of waiting prompts runs in the same step."""
        batch, rows = self.batch, self.batch.rows
        self._flush()
        real = [1 + len(d) for d in drafts]
        n = max(real)
        self._verify_shape = (len(rows), n)
        chunk = np.zeros((len(rows), n), dtype=np.uint32)
        for i, (r, d) in enumerate(zip(rows, drafts)):
            chunk[i, : real[i]] = [int(r.spec.tokens[-1]), *d]
        starts = [r.blocks.length for r in rows]
        with self._applied(batch.lora):  # adapter rows verify under their adapters: speculation stays exact
            logits = self.model(mx.array(chunk), cache=self.kv.caches([r.blocks for r in rows], chunk=real))
        first = np.fromiter((r.start + r.issued for r in rows), np.uint32, len(rows))
        positions = mx.array((first[:, None] + np.arange(n, dtype=np.uint32)).reshape(-1))
        flat = logits.reshape(len(rows) * n, logits.shape[-1])
        tokens, logprobs = expand(batch.sampling, n).sample(flat, None, positions, batch.top_logprobs)
        self._issue_prefill()
        mx.async_eval(tokens, *(logprobs or ()), *self.kv.take_writes())
        sampled = np.asarray(tokens.tolist()).reshape(len(rows), n)
        lps = tuple(a.tolist() for a in logprobs) if logprobs is not None else None
        out = []
        for i, (r, d) in enumerate(zip(rows, drafts)):  # kept drafts, then the first token sampled past them
            a = kept(d, sampled[i])
            self.spec.keep(r.spec, len(d), a)
            emitted = sampled[i, : a + 1].tolist()
            for j, token in enumerate(emitted):
                out.append(self._emit(r, token, lps, i * n + j))
                if r.done:
                    emitted = emitted[: j + 1]
                    break
            self.kv.truncate(r.blocks, starts[i] + len(emitted))  # the K/V of its input and kept drafts
            r.issued += len(emitted)
            self.spec.record(r.spec, len(d), min(a, len(emitted) - 1), len(emitted))
        self.spec.counters.verify_steps += 1
        batch.inputs = mx.array([int(r.spec.tokens[-1]) for r in rows], dtype=mx.uint32)
        batch.positions = mx.array(np.fromiter((r.start + r.issued for r in rows), np.uint32, len(rows)))
        batch.caches = self.kv.caches([r.blocks for r in rows])  # the old ones' working copies are stale
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the distinct blocks the rows hold."""
        return self.kv.nbytes([r.blocks for r in self.rows.values()])

    def close(self) -> None:
        if self.spec is not None:
            self.spec.close()
        self.compiled = None
        self.prefilling.clear()
        self.joining.clear()
        self.rows.clear()
        self.batch = _Batch()
        self._issued = None
