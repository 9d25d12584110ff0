"""Speculative decoding inside the continuous batch: drafts proposed per row, verified for the
whole batch in one forward pass (engine.batch_loop's verify step).

A row that drafts feeds `[its input, d1 .. dk]` in one call; the rows that do not draft ride
along with their one input token (the call is a right-padded chunk through the paged cache).
Every position's logits then go through the batch's own sampler (engine.batch_sampling), the
greedy argmax or the seeded Gumbel draw that decoding without speculation would have made for
that output position, and a row keeps its drafts while they equal what was sampled, plus the
first sampled token that differs (or the one after the last draft). So:

- greedy rows give exactly the tokens they give without speculation;
- sampled rows too, token for token under the same seed: each position's draw is keyed by the
  row's key and the output position (`batch_sampling.fold`), not by the step. This is the
  standard rejection sampling for drafts that are one token each (prompt lookup, and a draft
  model read greedily): a draft d is kept with probability p(d) = min(1, p(d) / q(d)), and a
  rejected position takes a token from p with d excluded, the normalized residual (p - q)+.

The K/V written for rejected drafts are cut off after the step (`BatchKV.truncate`).

Who drafts: a row whose tokens the host knows (a pipelined loop first reads its step in flight
when a row would draft on the tokens it has; a draft model's loop runs unpipelined), which has
no grammar, thinking cap or penalties, and which has room before `max_tokens`. A batch with such
a constrained row verifies nothing that step (the masks are per token). A row whose
recent drafts were mostly rejected (`min_acceptance`) pauses, 4 steps at first and twice as long
each time after, so open-ended output costs a lookup a step and rarely a wasted verify. And a
step verifies only when it should pay: the loop measures what plain steps (by rows) and verify
steps (by rows and width) cost on this hardware, each kind apart (`StepCosts`; the step after a
verify, which rebuilds the decode working copies, counted with it), and verifies when the drafts'
expected keep makes tokens per second higher.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import mlx.core as mx

from .batch_sampling import BatchSampling
from .config import SpeculativeConfig

if TYPE_CHECKING:
    from .draft_model import ModelDrafter

EMA = 0.5  # weight of a step's acceptance in a row's running estimate
PAUSE_MIN, PAUSE_MAX = 4, 256  # steps a row with low acceptance waits before drafting again
EXPLORE = 64  # a verify step that does not pay is still taken once in this many, to measure again
FAIR = 0.9  # a verify step may slow no row's own token rate below this share of a plain step's
# In a pipelined loop (a GPU) a verify step must promise this much more of the batch's tokens a
# second than a plain step: it also stops the overlap of host and device, which its measurement
# sees only in part (verify steps taken at par made decoding slower: the lab notebook's
# *Speculation on the H100*). An unpipelined loop (the CPU) takes a verify step at par.
PIPELINED_MARGIN = 1.25


class NgramIndex:
    """Prompt lookup's index of one row: each n-gram of its tokens (n in [n_min, n_max]) mapped to
    the position of the token after its latest occurrence. Kept as tokens arrive (n_max entries
    per token), so a lookup is n_max dictionary probes, not a scan of the row."""

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.after: dict[tuple[int, ...], int] = {}

    def add(self, tokens: list[int], start: int) -> None:
        """Index what `tokens[start:]` (the row's newest tokens) follow."""
        for p in range(max(1, start), len(tokens)):
            for n in range(self.n_min, min(self.n_max, p) + 1):
                self.after[tuple(tokens[p - n : p])] = p

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the row's last n tokens
        (the longest n that occurred), else none."""
        length = len(tokens)
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            p = self.after.get(tuple(tokens[length - n :]))
            if p is not None:
                return tokens[p : p + k]
        return []


@dataclass(eq=False)
class RowSpec:
    """What speculation keeps of one row: its tokens on the host, and how well it drafts."""

    tokens: list[int]  # the row's tokens (prompt, then output)
    index: NgramIndex | None = None  # prompt lookup's (method ngram)
    estimate: float = 1.0  # recent share of its draft tokens accepted
    floor: float = 0.3  # min_acceptance
    pause: int = 0  # steps left before it drafts again
    pauses: int = 0  # pauses so far (each one twice as long)

    def extend(self, tokens: list[int]) -> None:
        start = len(self.tokens)
        self.tokens.extend(tokens)
        if self.index is not None:
            self.index.add(self.tokens, start)

    def lookup(self, k: int) -> list[int]:
        return self.index.lookup(self.tokens, k)

    def judge(self, drafted: int, accepted: int) -> None:
        """A verify step kept `accepted` of its `drafted` tokens: pause when drafting stops paying."""
        self.estimate = (1 - EMA) * self.estimate + EMA * accepted / drafted
        if self.estimate < self.floor:
            self.pause = min(PAUSE_MAX, PAUSE_MIN << self.pauses)
            self.pauses += 1
            self.estimate = (1 + self.floor) / 2  # after the pause, a second chance, not full trust
        elif accepted == drafted:
            self.pauses = max(0, self.pauses - 1)


@dataclass
class SpecCounters:
    verify_steps: int = 0  # steps that verified drafts
    drafting_rows: int = 0  # row-steps that drafted
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens the verify steps' rows produced (kept drafts + one sampled each)
    rows: int = 0  # row-steps in verify steps (drafting or not)

    def stats(self, method: str) -> dict:
        return {
            "method": method,
            "verify_steps": self.verify_steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
            # tokens a drafting row gets from one forward pass (1 without speculation)
            "tokens_per_step": round(1 + self.accepted / self.drafting_rows, 4) if self.drafting_rows else 1.0,
        }


@dataclass
class StepCosts:
    """What steps cost here, measured, as running averages: a plain decode step by its rows, a
    verify step by its rows and width (1 + its most drafts). The two kinds never share an
    estimate: a verify step runs the prompt-chunk path, so a step of N tokens costs what its kind
    costs (on a CPU both kinds cost about their tokens; on a GPU a plain step of N rows costs far
    less than a verify step of N tokens). A verify step is worth it when its expected tokens per
    second beat a plain step's; the hardware decides, not a guess.

    Cold start, a shape never measured: a batch whose plain step is unknown (neither measured nor
    between two measured sizes) decodes plain first, since that is what a verify step must beat;
    a verify shape is taken once to measure it, unless a measured verify step with no more rows
    and no more width (so no dearer) already does not pay, or, with none such, the cheapest
    verify step measured at all would not (on a GPU a verify step costs about the same at any
    small shape, and taking each of the 20 shapes of 5 rows once to measure it is 20 verify steps
    that do not pay)."""

    plain: dict[int, float] = field(default_factory=dict)  # seconds by rows
    verify: dict[tuple[int, int], float] = field(default_factory=dict)  # seconds by (rows, width)
    refused: int = 0  # verify steps declined in a row (every EXPLORE-th is taken, to measure again)
    margin: float = 1.0  # how much a verify step's batch rate must beat a plain step's (PIPELINED_MARGIN)

    def observe_plain(self, rows: int, seconds: float) -> None:
        _average(self.plain, rows, seconds)

    def observe_verify(self, rows: int, width: int, seconds: float) -> None:
        _average(self.verify, (rows, width), seconds)

    def predict(self, rows: int) -> float | None:
        """Seconds for a plain step of `rows`: measured, or between two measured sizes; None: unknown."""
        if rows in self.plain:
            return self.plain[rows]
        below = max((r for r in self.plain if r < rows), default=None)
        above = min((r for r in self.plain if r > rows), default=None)
        if below is None or above is None:
            return None
        lo, hi = self.plain[below], self.plain[above]
        return lo + (hi - lo) * (rows - below) / (above - below)

    def floor(self, rows: int, width: int) -> float | None:
        """The dearest measured verify step no larger than `rows` x `width` in either: what a verify
        step of that shape costs at least; None: none measured."""
        return max((s for (r, w), s in self.verify.items() if r <= rows and w <= width), default=None)

    def guess(self) -> float | None:
        """What a verify step of a shape never measured (and larger than none measured) may cost:
        the cheapest measured one. On a GPU a verify step costs about the same at any small shape,
        so one measurement stands for all; on a CPU it overprices a smaller shape, which is then
        measured at the next EXPLORE-th refusal. None: no verify step measured yet."""
        return min(self.verify.values(), default=None)

    def worth(self, expected: list[float], width: int) -> bool:
        """Whether a verify step `width` wide, whose rows should keep `expected` drafts each, beats
        a plain step: more tokens per second for the batch, and no row's own rate below FAIR of
        what a plain step gives it (a row that drafts nothing pays the width too)."""
        rows = len(expected)
        plain = self.predict(rows)
        if plain is None:
            return False  # cold start: the plain step first
        verify = self.verify.get((rows, width))
        if verify is None:  # cold start: taken unless even its floor, or a guess from other shapes, does not pay
            verify = self.floor(rows, width) or self.guess()
        if verify is None or _pays(expected, plain, verify, self.margin):
            self.refused = 0
            return True
        self.refused += 1
        if self.refused >= EXPLORE:
            self.refused = 0
            return True
        return False


def _average(seconds: dict, key, value: float) -> None:
    old = seconds.get(key)
    seconds[key] = value if old is None else (1 - EMA) * old + EMA * value


def _pays(expected: list[float], plain: float, verify: float, margin: float) -> bool:
    """A verify step of `verify` seconds against a plain step of `plain`: the batch's tokens per
    second `margin` times a plain step's or more, and its worst row's at least FAIR of a plain step's."""
    rows = len(expected)
    return (rows + sum(expected)) / verify >= margin * rows / plain and (1 + min(expected)) / verify >= FAIR / plain


@dataclass
class Speculator:
    """The batch loop's drafts: which rows draft, what they propose (prompt lookup, or the draft
    model: engine.draft_model), how they fared."""

    config: SpeculativeConfig
    drafter: ModelDrafter | None = None  # method "draft"
    counters: SpecCounters = field(default_factory=SpecCounters)
    costs: StepCosts = field(default_factory=StepCosts)

    def worth(self, specs: list[RowSpec], drafts: list[list[int]]) -> bool:
        """Whether verifying these drafts should beat a plain step (each row's recent acceptance
        share times its drafts is what it should keep)."""
        width = 1 + max(len(d) for d in drafts)
        return self.costs.worth([s.estimate * len(d) for s, d in zip(specs, drafts)], width)

    def start(self, tokens: list[int]) -> RowSpec:
        cfg = self.config
        index = NgramIndex(cfg.ngram_min, cfg.ngram_max) if self.drafter is None else None
        spec = RowSpec([], index, floor=cfg.min_acceptance)
        spec.extend(list(tokens))
        return spec

    def drafts(self, specs: list[RowSpec], rooms: list[int]) -> list[list[int]]:
        """Each row's drafts (at most its room): none while it pauses, has no room, or (prompt
        lookup) its last tokens never occurred before."""
        cfg = self.config
        wants = []
        for i, (spec, room) in enumerate(zip(specs, rooms)):
            if spec.pause > 0:
                spec.pause -= 1
            elif room > 0:
                wants.append(i)
        out: list[list[int]] = [[] for _ in specs]
        if not wants:
            return out
        if self.drafter is None:
            for i in wants:
                k = min(cfg.num_draft_tokens, rooms[i])
                out[i] = specs[i].lookup(k)
            return out
        k = cfg.num_draft_tokens
        expected = [specs[i].estimate * min(k, rooms[i]) if i in wants else 0.0 for i in range(len(specs))]
        if not self.costs.worth(expected, 1 + k):
            return out  # a draft model's drafts cost forward passes: decided before they are made
        proposed = self.drafter.propose([specs[i] for i in wants], k)
        for i, drafts in zip(wants, proposed):
            out[i] = drafts[: rooms[i]]
        return out

    def may_verify(self, specs: list[RowSpec], rooms: list[int]) -> bool:
        """Whether a verify step may come next, judged on the tokens the host has (all but a
        pipelined loop's step in flight): a row would draft by prompt lookup (no pause runs down)
        and the cost rule would take a step of those drafts (a refusal here counts as one)."""
        k = self.config.num_draft_tokens
        drafts = [s.lookup(min(k, room)) if s.pause == 0 and room > 0 else [] for s, room in zip(specs, rooms)]
        return any(drafts) and self.worth(specs, drafts)

    def tick(self, specs: list[RowSpec]) -> None:
        """A step that made no drafts: the rows' pauses run down as `drafts` runs them down."""
        for spec in specs:
            spec.pause = max(0, spec.pause - 1)

    def keep(self, spec: RowSpec, drafted: int, accepted: int) -> None:
        """Before a verified row's tokens are emitted (a row that finishes leaves with them): its
        draft cache keeps what the target kept."""
        if drafted and self.drafter is not None:
            self.drafter.accept(spec, accepted, self.config.num_draft_tokens)

    def record(self, spec: RowSpec, drafted: int, accepted: int, emitted: int) -> None:
        """A verify step's outcome for one row (`drafted` 0: it rode along without drafts;
        `accepted`: the drafts it kept and emitted, up to a stop)."""
        c = self.counters
        c.rows += 1
        c.emitted += emitted
        if drafted:
            c.drafting_rows += 1
            c.drafted += drafted
            c.accepted += accepted
            spec.judge(drafted, accepted)

    def unused(self, specs: list[RowSpec]) -> None:
        """Drafts made but not verified (the step's writes did not fit): nothing was kept."""
        if self.drafter is not None:
            for spec in specs:
                self.drafter.accept(spec, 0, self.config.num_draft_tokens)

    def drop(self, spec: RowSpec | None) -> None:
        """A row left the loop."""
        if self.drafter is not None and spec is not None:
            self.drafter.drop(spec)

    def close(self) -> None:
        if self.drafter is not None:
            self.drafter.reset()

    def stats(self) -> dict:
        out = self.counters.stats(self.config.method)
        return out if self.drafter is None else {**out, **self.drafter.stats()}


def expand(sampling: BatchSampling, n: int) -> BatchSampling:
    """The batch's sampling arrays for `n` positions of each row ([B * n] rows, row-major): every
    position samples with its row's parameters and key. Penalties are not expanded (a batch with
    penalty rows does not verify)."""

    def rep(a):
        return None if a is None else mx.repeat(a, n, axis=0)

    return replace(
        sampling,
        inv_temp=rep(sampling.inv_temp),
        is_greedy=rep(sampling.is_greedy),
        top_k=rep(sampling.top_k),
        top_p=rep(sampling.top_p),
        min_p=rep(sampling.min_p),
        keys=rep(sampling.keys),
    )


def kept(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts a row keeps: the longest prefix equal to the tokens sampled before each."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a
