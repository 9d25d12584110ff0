"""The load-time check that a model's batched step is right: a warm-up batch against each prompt alone.

A family whose batched forward pass is wrong (mlx_lm's gemma2 before our grouped mask, nemotron_h's
Mamba layer over right padding) gives wrong tokens only when prompts of different lengths share a
step, and at some batch sizes only (gemma2: the KV-head count). So at load, before any user
request, the engine runs a few short prompts of different lengths through the same loop and cache
it will serve with, greedy: each alone, then together in batches of two and of the KV-head count.
Every row must pick the tokens it picked alone, with the same log-probabilities (up to float noise);
a step where the prompt alone had a near tie ends that row's comparison (either token is right).

Outcomes (`BatchCheck.outcome`): `passed`; `failed` (the model is served one request at a time,
logged loudly and in the engine's stats); `solo` (a prompt fails even alone in a batch loop, but
mlx_lm's own `generate_step` serves it: one request at a time on engine.solo_loop, no prefix
reuse, logged loudly); `unservable` (it fails there too: the model is refused at load, with the
errors). It costs a few dozen tokens of compute and a trace or two of
the compiled step (seconds on a CPU), so its outcome is kept on disk under the model's identity:
its files, the device and dtype, the loop's settings, MLX's and mlx_lm's versions and the engine's
own source; a load with the same identity reads it back. `engine.batch_check: false` skips it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import mlx.core as mx

from .config import EngineConfig
from .kv.manager import make_cache_manager
from .request import Request
from .sampling import SamplingParams
from .scheduler import Scheduler
from .text_stream import TextStream

log = logging.getLogger(__name__)

STEPS = 4  # tokens decoded per prompt
NEAR_TIE = 0.05  # nats between the alone run's best two tokens: either may win in a batch
LOGPROB_TOLERANCE = 0.5  # nats between a token's log-probability batched and alone
TEXT = (
    "The river carried the boat past the old mill, where the miller's children waved from the bank "
    "and the dog barked at the ducks that drifted slowly down toward the bridge in the evening light."
)


@dataclass
class BatchCheck:
    outcome: str  # passed, failed, solo, unservable or skipped
    detail: str = ""

    def stats(self) -> dict:
        return {"batch_check": self.outcome, "batch_check_detail": self.detail}


# What changes the outcome besides the model: the loop's settings.
LOOP_FIELDS = (
    "paged_cache", "block_size", "prefill_step_size", "compiled_decode", "pipelined_decode",
    "decode_column_write", "unpadded_decode", "state_interval", "fast_cpu", "kv_bits", "kv_group_size",
)  # fmt: skip


def check_batching(model, tokenizer, config: EngineConfig, files: Path | None = None, cache: Path | None = None):
    """The warm-up batch's outcome: read back from `cache` (a directory) when a check of the same
    identity (the model's `files`, ...) is there, else run on a throwaway scheduler and cache built
    like the real ones, and kept there."""
    if not config.batch_check:
        return BatchCheck("skipped", "engine.batch_check is off")
    path = None if files is None or cache is None else cache / f"{_identity(files, config)}.json"
    if path is not None and path.is_file():
        try:
            return BatchCheck(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            log.warning("unreadable batch check %s: checking again", path)
    check = _check(model, tokenizer, config)
    if path is not None and check.outcome in ("passed", "failed", "solo"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(check)}.tmp")
        tmp.write_text(json.dumps(asdict(check)))
        tmp.replace(path)
    return check


def files_digest(files: Path) -> str:
    """A model's identity on disk: its files' names, sizes and modification times (a model
    exported or converted again is another model). Shared by this check's cache and the disk KV
    cache (engine.kv.disk_tier)."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(files.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _identity(files: Path, config: EngineConfig) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(files_digest(files).encode())
    h.update(repr([getattr(config, k) for k in LOOP_FIELDS]).encode())
    h.update(f"{mx.default_device()}|{metadata.version('mlx')}|{metadata.version('mlx-lm')}".encode())
    for src in sorted(Path(__file__).parent.rglob("*.py")):  # the engine's own code
        h.update(src.read_bytes())
    return h.hexdigest()


def _check(model, tokenizer, config: EngineConfig) -> BatchCheck:
    sizes = sorted({2, kv_heads(model)} - {1})
    if config.max_num_seqs < 2:
        return BatchCheck("skipped", "max_num_seqs is 1: nothing is batched")
    ids = tokenizer.encode(TEXT)
    width = max(sizes)
    # All different, and one prefill chunk each, so that every row decodes in the same steps.
    span = min(len(ids) - width, config.prefill_step_size + 1) - 3
    lengths = [3 + span * i // max(1, width - 1) for i in range(width)]
    prompts = [ids[i : i + n] for i, n in enumerate(lengths)]  # no shared prefix: they run together
    cfg = config.model_copy(update={"cache_memory_mb": 64, "max_num_seqs": width, "prefill_batch_size": width})
    sched = Scheduler(model, tokenizer, cfg, make_cache_manager(model, cfg))  # one loop: its traces are reused
    try:
        try:
            alone = [_run(sched, [p])[0] for p in prompts]
        except Exception as exc:  # noqa: BLE001 - reported: the model cannot be served batched at all
            return _solo_or_unservable(model, tokenizer, cfg, prompts, f"{type(exc).__name__}: {exc}")
        for size in sizes:
            try:
                together = _run(sched, prompts[:size])
            except Exception as exc:  # noqa: BLE001 - a batch that fails is a batch that is wrong
                return BatchCheck("failed", f"a batch of {size} fails: {type(exc).__name__}: {exc}")
            for row, (got, want) in enumerate(zip(together, alone)):
                why = _differs(got, want)
                if why:
                    return BatchCheck("failed", f"in a batch of {size}, prompt {row} ({lengths[row]} tokens): {why}")
    finally:
        sched.gen.close()
    return BatchCheck("passed", f"batches of {', '.join(map(str, sizes))} match each prompt alone")


def _solo_or_unservable(model, tokenizer, config: EngineConfig, prompts: list[list[int]], why: str) -> BatchCheck:
    """A prompt alone failed in the batch loop: mlx_lm's own generate_step, one request at a time
    (engine.solo_loop), if it serves the prompts; else the model cannot be served."""
    sched = Scheduler(model, tokenizer, config, make_cache_manager(model, config), solo=True)
    try:
        for p in prompts:
            _run(sched, [p])
    except Exception as exc:  # noqa: BLE001 - reported: the model cannot be served
        return BatchCheck("unservable", f"a prompt alone fails: {why}; and on mlx_lm's generate_step: {exc}")
    finally:
        sched.gen.close()
    return BatchCheck("solo", f"a prompt alone fails in a batch loop ({why}): one request at a time, unbatched")


def kv_heads(model) -> int:
    args = getattr(model, "args", None)
    args = getattr(args, "text_config", None) or args
    n = getattr(args, "num_key_value_heads", None)
    return n if isinstance(n, int) and n > 0 else 2


def _run(sched: Scheduler, prompts: list[list[int]]) -> list[list[tuple[int, float, float]]]:
    """Greedy tokens of each prompt, all submitted at once, cold (the prefix cache cleared first):
    (token, its logprob, the best other's)."""
    sched.cache.clear()
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=True, top_logprobs=2)
    detokenizer = sched.tokenizer.detokenizer
    out: dict[str, list] = {}
    for i, p in enumerate(prompts):
        sched.add(Request(f"check-{i}", list(p), params, STEPS, TextStream(detokenizer, [])))
    for _ in range(64 * STEPS * len(prompts)):
        if not sched.has_work():
            break
        for o in sched.step():
            for e in o.logprobs or ():
                others = [lp for t, _, lp in e["top"] if t != e["id"]]
                out.setdefault(o.request_id, []).append((e["id"], e["logprob"], max(others, default=-1e9)))
        for request_id, exc in sched.take_rejected():
            raise RuntimeError(f"{request_id}: {exc}")
    return [out.get(f"check-{i}", []) for i in range(len(prompts))]


def _differs(got: list[tuple[int, float, float]], want: list[tuple[int, float, float]]) -> str:
    """Why a row batched differs from the same prompt alone ('' when it does not)."""
    for step, ((tok, lp, _), (ref, ref_lp, ref_other)) in enumerate(zip(got, want)):
        if ref_lp - ref_other < NEAR_TIE:
            return ""  # a near tie alone: from here either continuation is right
        if tok != ref:
            return f"token {tok} at step {step}, {ref} alone"
        if abs(lp - ref_lp) > LOGPROB_TOLERANCE:
            return f"logprob {lp:.3f} at step {step}, {ref_lp:.3f} alone"
    if len(got) != len(want):
        return f"{len(got)} tokens, {len(want)} alone"
    return ""
