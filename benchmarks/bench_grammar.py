"""Grammar engines for structured output (JSON schema / json_object / forced tool calls), measured.

    python -m benchmarks.bench_grammar [--tokenizer DIR] [--stress-tokenizer DIR | --no-stress]
        [--reps 5] [--batch-steps 48] [--compile-timeout-s 90] [--quick] [--json-out PATH]

Candidates: llguidance (a dependency) and outlines-core (installed only for this benchmark).
xgrammar is not run: its package imports torch at module level (see EXCLUDED).

For each tokenizer (default: the SmolLM2-135M MLX export, vocab 49k; stress case: Gemma-3-270m,
vocab 262k) and each of SCHEMAS (10 JSON schemas + json_object):
1. compile: schema -> the engine's reusable object, first and second time (neither engine caches
   across calls: the second time shows warm-up effects only). llguidance: grammar_from_json_schema
   + LLMatcher(); outlines-core: build_regex_from_schema + Index(regex, vocabulary).
   The compiled object is what a server caches per schema: llguidance a template LLMatcher,
   outlines-core the Index.
2. per request: a fresh matcher from the cached object (llguidance: template.deep_copy();
   outlines-core: Guide(index)). Without a cache, llguidance pays its compile per request (~1 ms),
   outlines-core its Index build (0.1 s to many s).
3. per token, along a real path: a valid instance of the schema (hand-written, checked with
   jsonschema) tokenized with the HF tokenizer, walked token by token: next-token mask into an
   int32 bitmask row, check the token's bit, consume it; at the end the EOS bit must be set.
   --reps walks, each with a fresh matcher. Mean and p99 microseconds per token (mask + consume),
   "cold" for the first walk after compile (llguidance builds lexer states lazily; copies of one
   template share them) and "warm" for the later ones.
4. batch of 16 rows (schemas cycled, rows staggered along their paths, a finished row restarts with
   a fresh matcher): llguidance's LLExecutor (fill_next_token_bitmask_par / consume_token_par,
   default threads and os.cpu_count() threads) against a sequential loop over an identical set of
   16 states (masks compared); outlines-core sequential for reference.
5. apply_bitmask (below): a [B, vocab/32] int32 bitmask onto [B, vocab] float32 logits in MLX, at
   B = 1 and 16, eager and mx.compile'd, with and without the numpy -> mx.array copy of the mask.

Each engine runs in its own worker process (spawn), schema by schema in alternation, so that a
compile that runs away can be stopped (--compile-timeout-s) and both engines see the same machine
state per schema. The machine may be shared: compare engines by the ratios within one run.

The outlines-core vocabulary is built from the same token bytes llguidance decodes (one
byte-string per token id; special tokens left out, EOS passed separately).

Prints one JSON document, then markdown tables; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time

from .output import emit

DEFAULT_TOKENIZER = "/tmp/smollm2-f32"
DEFAULT_STRESS_TOKENIZER = "/tmp/gemma-export"
BATCH_ROWS = 16


def log(msg: str) -> None:
    print(f"[bench_grammar {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The bitmask helper (the engine will own it): llguidance's mlx helper and outlines-core's use a
# Metal kernel, which does not run on CPU or CUDA builds of MLX.


def apply_bitmask(logits, bitmask):
    """logits [B, V] (any float dtype) masked by bitmask [B, W] int32 (bit j of word w allows token
    32*w + j, as llguidance/xgrammar/outlines-core write it): disallowed tokens become -inf.
    Tokens past 32*W (a model vocab padded beyond the tokenizer's) are disallowed.
    Wrap it in mx.compile in the engine: on CPU the fused version measured 4-6x faster than eager
    (about one argmax over the logits); mx.compile traces once per input shape (1-6 ms here)."""
    import mlx.core as mx

    b, v = logits.shape
    shifts = mx.arange(32, dtype=mx.int32)
    bits = mx.right_shift(bitmask[:, :, None], shifts) & 1  # [B, W, 32]; sign bits fine after & 1
    allowed = bits.reshape(b, -1).astype(mx.bool_)
    n = allowed.shape[1]
    if n > v:
        allowed = allowed[:, :v]
    elif n < v:
        allowed = mx.concatenate([allowed, mx.zeros((b, v - n), dtype=mx.bool_)], axis=1)
    return mx.where(allowed, logits, mx.array(-math.inf, dtype=logits.dtype))


# --------------------------------------------------------------------------------------------
# Schemas, each with a valid instance (keys in schema order: both engines emit properties in the
# order the schema lists them). Objects say additionalProperties: false, as OpenAI strict mode
# does (outlines-core never allows extra keys; llguidance would by default).


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


_STR = lambda n: {"type": "string", "maxLength": n}  # noqa: E731

SCHEMAS: dict[str, tuple[dict, object]] = {
    "person": (
        _obj(
            {
                "name": _STR(40),
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "email": _STR(80),
                "is_member": {"type": "boolean"},
            },
            ["name", "age", "is_member"],
        ),
        {"name": "Ana López", "age": 34, "is_member": True},
    ),
    "tool_call": (  # a forced tool call: {"name": const, "arguments": {...}}
        _obj(
            {
                "name": {"const": "get_weather"},
                "arguments": _obj(
                    {
                        "location": _STR(64),
                        "unit": {"enum": ["celsius", "fahrenheit"]},
                        "days": {"type": "integer", "minimum": 1, "maximum": 14},
                    },
                    ["location", "unit"],
                ),
            }
        ),
        {"name": "get_weather", "arguments": {"location": "Zürich, Switzerland", "unit": "celsius", "days": 3}},
    ),
    "nested_user": (
        _obj(
            {
                "user": _obj(
                    {
                        "id": {"type": "integer"},
                        "name": _STR(50),
                        "address": _obj(
                            {
                                "street": _STR(80),
                                "city": _STR(40),
                                "country": {"enum": ["FR", "DE", "ES", "IT", "US", "JP"]},
                                "zip": _STR(10),
                            },
                            ["street", "city", "country"],
                        ),
                    }
                ),
                "tags": {"type": "array", "items": _STR(20), "minItems": 1, "maxItems": 5},
            }
        ),
        {
            "user": {
                "id": 90210,
                "name": "Jean Dupont",
                "address": {"street": "12 rue de la Paix", "city": "Paris", "country": "FR", "zip": "75002"},
            },
            "tags": ["vip", "newsletter"],
        },
    ),
    "order": (
        _obj(
            {
                "order_id": _STR(20),
                "items": {
                    "type": "array",
                    "items": _obj(
                        {
                            "sku": _STR(16),
                            "qty": {"type": "integer", "minimum": 1},
                            "price": {"type": "number"},
                        }
                    ),
                    "minItems": 1,
                    "maxItems": 10,
                },
                "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                "express": {"type": "boolean"},
            },
            ["order_id", "items", "currency"],
        ),
        {
            "order_id": "A-1042",
            "items": [
                {"sku": "TEA-GRN-100", "qty": 2, "price": 4.5},
                {"sku": "MUG-BLU", "qty": 1, "price": 12.99},
                {"sku": "SPOON-07", "qty": 6, "price": 0.75},
            ],
            "currency": "EUR",
            "express": False,
        },
    ),
    "anyof_result": (
        _obj(
            {
                "result": {
                    "anyOf": [
                        _obj({"status": {"const": "ok"}, "value": {"type": "number"}}),
                        _obj(
                            {
                                "status": {"const": "error"},
                                "code": {"type": "integer"},
                                "message": _STR(100),
                            }
                        ),
                    ]
                }
            }
        ),
        {"result": {"status": "error", "code": 404, "message": "The requested item was not found."}},
    ),
    "event": (
        _obj(
            {
                "title": _STR(60),
                "start": {"type": "string", "format": "date-time"},
                "day": {"type": "string", "format": "date"},
                "organizer": {"type": "string", "format": "email"},
                "online": {"type": "boolean"},
            },
            ["title", "start", "online"],
        ),
        {"title": "Quarterly review", "start": "2025-03-14T09:30:00Z", "online": True},
    ),
    "deep_config": (
        _obj(
            {
                "service": _obj(
                    {
                        "name": _STR(30),
                        "http": _obj(
                            {
                                "host": _STR(60),
                                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                "tls": _obj(
                                    {"enabled": {"type": "boolean"}, "min_version": {"enum": ["1.2", "1.3"]}}
                                ),
                            }
                        ),
                        "db": _obj(
                            {
                                "url": _STR(100),
                                "pool": _obj({"min": {"type": "integer"}, "max": {"type": "integer"}}),
                            }
                        ),
                    }
                )
            }
        ),
        {
            "service": {
                "name": "orchard-api",
                "http": {"host": "api.example.com", "port": 8443, "tls": {"enabled": True, "min_version": "1.3"}},
                "db": {"url": "postgres://db.internal:5432/orchard", "pool": {"min": 2, "max": 16}},
            }
        },
    ),
    "classification": (
        _obj(
            {
                "label": {
                    "enum": ["billing", "bug", "feature_request", "account", "security", "praise", "spam", "other"]
                },
                "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                "reasons": {"type": "array", "items": _STR(80), "maxItems": 3},
            }
        ),
        {
            "label": "bug",
            "confidence": 0.87,
            "reasons": ["mentions a crash on startup", "includes a stack trace"],
        },
    ),
    "optional_fields": (  # eight optional properties, three present
        _obj(
            {
                "nickname": _STR(30),
                "height_cm": {"type": "number"},
                "vegetarian": {"type": "boolean"},
                "shoe_size": {"type": "integer"},
                "language": {"enum": ["en", "fr", "de", "es"]},
                "bio": _STR(200),
                "pets": {"type": "array", "items": _STR(20), "maxItems": 4},
                "newsletter": {"type": "boolean"},
            },
            [],
        ),
        {"height_cm": 172.5, "language": "fr", "pets": ["cat"]},
    ),
    "mixed_arrays": (
        _obj(
            {
                "values": {
                    "type": "array",
                    "items": {"anyOf": [{"type": "integer"}, _STR(20), {"type": "boolean"}, {"type": "null"}]},
                    "maxItems": 12,
                },
                "matrix": {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 4},
                    "minItems": 1,
                    "maxItems": 4,
                },
                "ids": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
            }
        ),
        {
            "values": [1, "two", True, None, 5],
            "matrix": [[1.5, 2.0], [-3.25, 4.0, 0.5]],
            "ids": [7, 8, 9],
        },
    ),
    "json_object": (  # response_format {"type": "json_object"}: any JSON object
        {"type": "object"},
        {"title": "Report", "count": 3, "ok": True, "tags": ["a", "b"], "meta": {"owner": None, "score": 0.75}},
    ),
}

EXCLUDED = [
    {
        "engine": "xgrammar 0.2.9",
        "reason": (
            "not run: the wheel's METADATA requires torch>=1.10, transformers, apache-tvm-ffi and "
            "(Linux x86_64) triton; `import xgrammar` imports torch at module level "
            "(xgrammar/matcher.py: `import torch`, bitmask_dtype = torch.int32; also contrib/hf.py, "
            "testing.py), so no bitmask can be computed without torch. Its C++ core takes any DLPack "
            "int32 array, but only behind that Python package. We do not ship torch or triton."
        ),
    }
]


def instance_text(instance) -> str:
    return json.dumps(instance, ensure_ascii=False)


def check_instances() -> None:
    import jsonschema

    for name, (schema, inst) in SCHEMAS.items():
        jsonschema.validate(inst, schema, format_checker=jsonschema.FormatChecker())


# --------------------------------------------------------------------------------------------
# Engine adapters (used inside the workers).


class _LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok):
        import llguidance
        import llguidance.hf

        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok)
        self.setup_s = time.perf_counter() - t0
        self.version = llguidance.__version__ if hasattr(llguidance, "__version__") else _dist_version("llguidance")
        self.vocab = self.tok.vocab_size
        self.eos = self.tok.eos_token

    def compile(self, schema):
        """The reusable object is a template matcher (cached per schema); requests deep_copy it."""
        from llguidance import LLMatcher

        grammar = LLMatcher.grammar_from_json_schema(schema)
        m = LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m, m

    def new_state(self, template):
        return template.deep_copy()

    def fill(self, m, ptr: int, nbytes: int) -> None:
        m.unsafe_compute_mask_ptr(ptr, nbytes)

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token)

    def error(self, m) -> str | None:
        return m.get_error() if m.is_error() else None


class _OutlinesCore:
    name = "outlines_core"

    def __init__(self, hf_tok):
        import llguidance.hf
        from outlines_core import Vocabulary

        llt = llguidance.hf.from_tokenizer(hf_tok)  # only for its exact token bytes
        eos = hf_tok.eos_token_id
        t0 = time.perf_counter()
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(llt.vocab_size):
            if i == eos or llt.is_special_token(i):
                continue
            by_bytes.setdefault(llt.decode_bytes([i]), []).append(i)
        self.vocabulary = Vocabulary(eos, by_bytes)
        self.setup_s = time.perf_counter() - t0
        self.version = _dist_version("outlines_core")
        self.vocab = llt.vocab_size
        self.eos = eos

    def compile(self, schema):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema))
        index = Index(regex, self.vocabulary)
        self.last_regex_len = len(regex)
        return index, Guide(index)

    def new_state(self, index):
        from outlines_core import Guide

        return Guide(index)

    def fill(self, g, ptr: int, nbytes: int) -> None:
        g.write_mask_into(ptr, nbytes // 4, 4)

    def consume(self, g, token: int) -> bool:
        try:
            g.advance(token, return_tokens=False)
            return True
        except Exception:  # noqa: BLE001 - outlines raises on a token it does not allow
            return False

    def error(self, g) -> str | None:
        return None


ENGINES = {"llguidance": _LLGuidance, "outlines_core": _OutlinesCore}


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _stats_us(ns: list[int]) -> dict:
    import numpy as np

    if not ns:
        return {}
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "mean": round(float(a.mean()), 2),
        "p50": round(float(np.percentile(a, 50)), 2),
        "p99": round(float(np.percentile(a, 99)), 2),
        "max": round(float(a.max()), 2),
        "n": int(a.size),
    }


def _bit(row, token: int) -> bool:
    return bool((int(row[token >> 5]) >> (token & 31)) & 1)


def _walk(eng, art, tokens: list[int], reps: int) -> dict:
    """reps walks along tokens, each from a fresh state: mask -> check bit -> consume; EOS at the end."""
    import numpy as np

    words = (eng.vocab + 31) // 32
    bm = np.zeros((1, words), dtype=np.int32)
    row = bm[0]
    ptr, nbytes = bm.ctypes.data, bm.nbytes
    new_ns, first_mask_ns, mask_ns, consume_ns, step_ns = [], [], [], [], []
    cold_ns, warm_ns = [], []
    failures = []
    allowed_counts = []
    for rep in range(reps):
        t0 = time.perf_counter_ns()
        st = eng.new_state(art)
        new_ns.append(time.perf_counter_ns() - t0)
        for i, tok in enumerate(tokens):
            bm.fill(-1)  # so a mask that does not write every word would be caught
            t0 = time.perf_counter_ns()
            eng.fill(st, ptr, nbytes)
            t1 = time.perf_counter_ns()
            ok_bit = _bit(row, tok)
            t2 = time.perf_counter_ns()
            ok = eng.consume(st, tok)
            t3 = time.perf_counter_ns()
            if i == 0:
                first_mask_ns.append(t1 - t0)
            mask_ns.append(t1 - t0)
            consume_ns.append(t3 - t2)
            step_ns.append((t1 - t0) + (t3 - t2))
            (cold_ns if rep == 0 else warm_ns).append((t1 - t0) + (t3 - t2))
            if rep == 0:
                allowed_counts.append(int(np.unpackbits(bm.view(np.uint8)).sum()))
            if not (ok_bit and ok):
                failures.append({"pos": i, "token": tok, "bit": ok_bit, "consumed": ok, "error": eng.error(st)})
                break
        else:
            bm.fill(0)
            eng.fill(st, ptr, nbytes)
            if not _bit(row, eng.eos):
                failures.append({"pos": len(tokens), "token": eng.eos, "bit": False, "note": "EOS not allowed at end"})
        if failures:
            break
    return {
        "ok": not failures,
        "failures": failures[:3],
        "new_state_us": _stats_us(new_ns),
        "first_mask_us": _stats_us(first_mask_ns),
        "mask_us": _stats_us(mask_ns),
        "consume_us": _stats_us(consume_ns),
        "per_token_us": _stats_us(step_ns),
        "cold_per_token_us": _stats_us(cold_ns),
        "warm_per_token_us": _stats_us(warm_ns),
        "allowed_tokens_min": min(allowed_counts) if allowed_counts else None,
        "allowed_tokens_max": max(allowed_counts) if allowed_counts else None,
    }


def _batch(eng, arts: dict, rows: list[tuple[str, list[int]]], steps: int, threads: list[int | None]) -> dict:
    """16 rows, each walking its own path, restarting with a fresh state when done."""
    import numpy as np

    words = (eng.vocab + 31) // 32
    b = len(rows)

    class Set:
        def __init__(self):  # rows start staggered along their paths (prefix consumed untimed)
            self.states = [eng.new_state(arts[name]) for name, _ in rows]
            self.pos = [(i * 5) % len(rows[i][1]) for i in range(b)]
            for i, st in enumerate(self.states):
                for tok in rows[i][1][: self.pos[i]]:
                    eng.consume(st, tok)

        def next_tokens(self):
            return [rows[i][1][self.pos[i]] for i in range(b)]

        def advance(self):
            for i in range(b):
                self.pos[i] += 1
                if self.pos[i] == len(rows[i][1]):
                    self.states[i] = eng.new_state(arts[rows[i][0]])
                    self.pos[i] = 0

    out: dict = {"rows": b, "steps": steps, "schemas": [n for n, _ in rows]}
    seq = Set()
    bm_seq = np.zeros((b, words), dtype=np.int32)
    base, stride = bm_seq.ctypes.data, words * 4
    par_sets = {}
    execs = {}
    if eng.name == "llguidance":
        import llguidance
        import llguidance.numpy as lln

        for t in threads:
            execs[t] = llguidance.LLExecutor() if t is None else llguidance.LLExecutor(num_threads=t)
            par_sets[t] = Set()
        bm_par = np.zeros((b, words), dtype=np.int32)
    seq_mask, seq_cons = [], []
    par_mask = {t: [] for t in par_sets}
    par_cons = {t: [] for t in par_sets}
    mismatches = 0
    for step in range(steps):
        # sequential
        toks = seq.next_tokens()
        t0 = time.perf_counter_ns()
        for i, st in enumerate(seq.states):
            eng.fill(st, base + i * stride, stride)
        t1 = time.perf_counter_ns()
        for i, st in enumerate(seq.states):
            eng.consume(st, toks[i])
        t2 = time.perf_counter_ns()
        seq_mask.append(t1 - t0)
        seq_cons.append(t2 - t1)
        for t, ps in par_sets.items():
            ex = execs[t]
            ptoks = ps.next_tokens()
            t0 = time.perf_counter_ns()
            lln.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ps.states)], bm_par)
            t1 = time.perf_counter_ns()
            res = lln.consume_token_par(ex, list(zip(ps.states, ptoks)))
            t2 = time.perf_counter_ns()
            par_mask[t].append(t1 - t0)
            par_cons[t].append(t2 - t1)
            if not np.array_equal(bm_par, bm_seq) or not all(res):
                mismatches += 1
            ps.advance()
        seq.advance()
    out["sequential"] = {"mask_us": _stats_us(seq_mask), "consume_us": _stats_us(seq_cons),
                         "step_us": _stats_us([a + c for a, c in zip(seq_mask, seq_cons)])}
    for t in par_sets:
        key = f"parallel_threads_{'default' if t is None else t}"
        out[key] = {"mask_us": _stats_us(par_mask[t]), "consume_us": _stats_us(par_cons[t]),
                    "step_us": _stats_us([a + c for a, c in zip(par_mask[t], par_cons[t])])}
    out["par_seq_mask_mismatch_steps"] = mismatches if par_sets else None
    return out


def _worker(engine_name: str, tok_dir: str, conn) -> None:
    """One engine, one tokenizer: answers ("schema", ...) and ("batch", ...) requests."""
    import gc

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    eng = ENGINES[engine_name](hf_tok)
    conn.send(("ready", {"setup_s": round(eng.setup_s, 3), "version": eng.version, "vocab": eng.vocab,
                         "eos": eng.eos}))
    arts: dict = {}
    while True:
        msg = conn.recv()
        if msg[0] == "quit":
            return
        if msg[0] == "schema":
            _, name, schema, tokens, reps, second_if_below_s = msg
            res: dict = {}
            try:
                gc.collect()
                t0 = time.perf_counter()
                art, _ = eng.compile(schema)
                res["compile_first_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                if hasattr(eng, "last_regex_len"):
                    res["regex_chars"] = eng.last_regex_len
                if res["compile_first_ms"] / 1e3 < second_if_below_s:
                    t0 = time.perf_counter()
                    art, _ = eng.compile(schema)
                    res["compile_second_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
                else:
                    res["compile_second_ms"] = None
                arts[name] = art
                res.update(_walk(eng, art, tokens, reps))
            except Exception as e:  # noqa: BLE001 - an unsupported schema is a result
                res["ok"] = False
                res["error"] = f"{type(e).__name__}: {e}"[:400]
            conn.send(("schema", name, res))
        elif msg[0] == "batch":
            _, rows, steps, threads = msg
            rows = [(n, t) for n, t in rows if n in arts]
            if not rows:
                conn.send(("batch", {"error": "no compiled schema"}))
                continue
            rows = [rows[i % len(rows)] for i in range(BATCH_ROWS)]
            conn.send(("batch", _batch(eng, arts, rows, steps, threads)))


class Worker:
    def __init__(self, engine: str, tok_dir: str, start_timeout_s: float):
        self.engine, self.tok_dir, self.start_timeout_s = engine, tok_dir, start_timeout_s
        self.info = None
        self._start()

    def _start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(self.engine, self.tok_dir, child), daemon=True)
        self.proc.start()
        child.close()
        msg = self._recv(self.start_timeout_s)
        if msg is None:
            raise RuntimeError(f"{self.engine} worker did not start in {self.start_timeout_s}s")
        self.info = msg[1]

    def _recv(self, timeout: float):
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                return None
        return None

    def request(self, msg, timeout: float):
        self.conn.send(msg)
        reply = self._recv(timeout)
        if reply is None:  # ran away or died: stop this worker (ours), start a fresh one
            self.proc.kill()
            self.proc.join()
            self._start()
        return reply

    def close(self):
        try:
            self.conn.send(("quit",))
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


# --------------------------------------------------------------------------------------------
# apply_bitmask in MLX


def bench_apply_bitmask(vocab: int, batch_sizes: list[int], iters: int) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    words = (vocab + 31) // 32
    compiled = mx.compile(apply_bitmask)
    out = []
    for b in batch_sizes:
        logits_np = rng.standard_normal((b, vocab), dtype=np.float32)
        bm_np = rng.integers(-(2**31), 2**31 - 1, size=(b, words), dtype=np.int64).astype(np.int32)
        bm_np[:, 0] = 0  # a row of mostly-disallowed words next to random ones
        logits = mx.array(logits_np)
        bm = mx.array(bm_np)
        mx.eval(logits, bm)
        # correctness against numpy
        ref = logits_np.copy()
        bits = ((bm_np[:, :, None] >> np.arange(32, dtype=np.int32)) & 1).reshape(b, -1)[:, :vocab]
        ref[bits == 0] = -np.inf
        got = np.array(apply_bitmask(logits, bm))
        t0 = time.perf_counter()
        got_c = np.array(compiled(logits, bm))  # first call of this shape: trace + compile
        compile_first_call_ms = round((time.perf_counter() - t0) * 1e3, 2)
        correct = bool(np.array_equal(got, ref) and np.array_equal(got_c, ref))

        def time_it(fn):
            for _ in range(5):
                fn()
            ns = []
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                fn()
                ns.append(time.perf_counter_ns() - t0)
            return _stats_us(ns)

        res = {
            "vocab": vocab,
            "B": b,
            "dtype": "float32",
            "device": str(mx.default_device()),
            "correct": correct,
            "compiled_first_call_ms": compile_first_call_ms,
            "eager_us": time_it(lambda: mx.eval(apply_bitmask(logits, bm))),
            "compiled_us": time_it(lambda: mx.eval(compiled(logits, bm))),
            "eager_with_np_copy_us": time_it(lambda: mx.eval(apply_bitmask(logits, mx.array(bm_np)))),
            "reference_argmax_us": time_it(lambda: mx.eval(mx.argmax(logits, axis=-1))),
        }
        out.append(res)
    return out


# --------------------------------------------------------------------------------------------


def _geomean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def run_tokenizer(label: str, tok_dir: str, args) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    paths = {}
    for name, (_, inst) in SCHEMAS.items():
        paths[name] = hf_tok.encode(instance_text(inst), add_special_tokens=False)
    names = list(SCHEMAS)
    if args.quick:
        names = names[:4] + ["json_object"]
    doc: dict = {"label": label, "dir": tok_dir, "vocab": len(hf_tok), "eos": hf_tok.eos_token_id,
                 "engines": {}, "schemas": []}
    workers = {}
    for eng in ENGINES:
        log(f"{label}: starting {eng} worker")
        workers[eng] = Worker(eng, tok_dir, start_timeout_s=120)
        doc["engines"][eng] = dict(workers[eng].info)
        log(f"{label}: {eng} ready (tokenizer/vocabulary setup {workers[eng].info['setup_s']}s)")
    try:
        for k, name in enumerate(names):
            schema = SCHEMAS[name][0]
            entry = {"name": name, "tokens": len(paths[name]), "text": instance_text(SCHEMAS[name][1])}
            order = list(ENGINES) if k % 2 == 0 else list(reversed(ENGINES))
            for eng in order:
                reply = workers[eng].request(
                    ("schema", name, schema, paths[name], args.reps, args.second_compile_below_s),
                    timeout=args.compile_timeout_s,
                )
                if reply is None:
                    res = {"ok": False, "error": f"timeout: compile + walk over {args.compile_timeout_s}s (worker restarted)"}
                else:
                    res = reply[2]
                entry[eng] = res
            lg, oc = entry.get("llguidance", {}), entry.get("outlines_core", {})
            if lg.get("ok") and oc.get("ok"):
                entry["ratio_outlines_over_llg"] = {
                    "compile_first": round(oc["compile_first_ms"] / lg["compile_first_ms"], 2),
                    "per_token_mean": round(oc["per_token_us"]["mean"] / lg["per_token_us"]["mean"], 2),
                    "per_token_p99": round(oc["per_token_us"]["p99"] / lg["per_token_us"]["p99"], 2),
                    "cold_per_token_mean": round(oc["cold_per_token_us"]["mean"] / lg["cold_per_token_us"]["mean"], 2),
                    "warm_per_token_mean": round(oc["warm_per_token_us"]["mean"] / lg["warm_per_token_us"]["mean"], 2),
                }
            doc["schemas"].append(entry)
            log(f"{label}: {name:16s} ({len(paths[name])} tok) " + "  ".join(
                f"{e}: " + (f"compile {entry[e]['compile_first_ms']:.1f} ms, {entry[e]['cold_per_token_us']['mean']:.1f} cold / "
                               f"{entry[e]['warm_per_token_us']['mean']:.1f} warm us/tok"
                            if entry[e].get("ok") else f"FAILED {entry[e].get('error') or entry[e].get('failures')}")
                for e in ENGINES))
        if not args.no_batch:
            rows = [(n, paths[n]) for n in names]
            doc["batch"] = {}
            threads: list[int | None] = [None]
            if (os.cpu_count() or 1) > 1:
                threads.append(os.cpu_count())
            for eng in ENGINES:
                log(f"{label}: batch of {BATCH_ROWS} rows, {eng}")
                reply = workers[eng].request(("batch", rows, args.batch_steps, threads), timeout=300)
                doc["batch"][eng] = reply[1] if reply else {"error": "timeout"}
    finally:
        for w in workers.values():
            w.close()
    # summary per engine
    doc["summary"] = {}
    for eng in ENGINES:
        ok = [s[eng] for s in doc["schemas"] if s.get(eng, {}).get("ok")]
        doc["summary"][eng] = {
            "schemas_ok": len(ok),
            "schemas": len(doc["schemas"]),
            "compile_first_ms_geomean": _r(_geomean([r["compile_first_ms"] for r in ok])),
            "compile_first_ms_max": _r(max((r["compile_first_ms"] for r in ok), default=None)),
            "new_state_us_geomean": _r(_geomean([r["new_state_us"]["mean"] for r in ok])),
            "per_token_us_mean_geomean": _r(_geomean([r["per_token_us"]["mean"] for r in ok])),
            "cold_per_token_us_mean_geomean": _r(_geomean([r["cold_per_token_us"]["mean"] for r in ok])),
            "warm_per_token_us_mean_geomean": _r(_geomean([r["warm_per_token_us"]["mean"] for r in ok])),
            "per_token_us_p99_max": _r(max((r["per_token_us"]["p99"] for r in ok), default=None)),
            "warm_per_token_us_p99_max": _r(max((r["warm_per_token_us"]["p99"] for r in ok), default=None)),
            "first_mask_us_geomean": _r(_geomean([r["first_mask_us"]["mean"] for r in ok])),
        }
    both = [s["ratio_outlines_over_llg"] for s in doc["schemas"] if "ratio_outlines_over_llg" in s]
    doc["summary"]["ratio_outlines_over_llg_geomean"] = {
        k: _r(_geomean([b[k] for b in both]))
        for k in ("compile_first", "per_token_mean", "per_token_p99", "cold_per_token_mean", "warm_per_token_mean")
    } if both else None
    return doc


def _r(x, nd: int = 2):
    return None if x is None else round(x, nd)


def _fmt(x, nd=1) -> str:
    if x is None:
        return "–"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def render(doc: dict) -> str:
    lines = []

    def tok_cell(r):
        c, w = r["cold_per_token_us"], r["warm_per_token_us"]
        return f"{_fmt(c['mean'])} / {_fmt(w['mean'])} / {_fmt(w['p99'])}"

    for t in doc["tokenizers"]:
        lines.append(f"\n### {t['label']} (vocab {t['vocab']:,})\n")
        lines.append("µs/token = next-token mask + consume; cold = first walk after compile, warm = later walks "
                     "(fresh matcher each: llguidance deep_copy of the cached template, outlines-core Guide(index)).\n")
        lines.append("| schema | tokens | llg compile ms 1st / 2nd | oc compile ms 1st / 2nd | llg µs/tok cold / warm / warm p99 "
                     "| oc µs/tok cold / warm / warm p99 | oc/llg warm µs/tok |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for s in t["schemas"]:
            cells = []
            for e in ENGINES:
                r = s.get(e, {})
                if r.get("ok"):
                    cells.append((f"{_fmt(r['compile_first_ms'], 2)} / {_fmt(r.get('compile_second_ms'), 2)}", tok_cell(r)))
                else:
                    why = (r.get("error") or str(r.get("failures")) or "failed")[:60].replace("|", "/")
                    cells.append((f"FAIL: {why}", "–"))
            ratio = s.get("ratio_outlines_over_llg", {}).get("warm_per_token_mean")
            lines.append(f"| {s['name']} | {s['tokens']} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | "
                         f"{cells[1][1]} | {_fmt(ratio, 2)}× |")
        sm = t["summary"]
        lines.append("")
        lines.append("| engine | schemas ok | tokenizer setup s | compile ms geomean / max | new matcher µs | "
                     "first mask µs | µs/tok cold (geomean) | µs/tok warm (geomean) | warm p99 (worst schema) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for e in ENGINES:
            m = sm[e]
            lines.append(f"| {e} | {m['schemas_ok']}/{m['schemas']} | {t['engines'][e]['setup_s']} | "
                         f"{_fmt(m['compile_first_ms_geomean'], 2)} / {_fmt(m['compile_first_ms_max'], 2)} | "
                         f"{_fmt(m['new_state_us_geomean'])} | {_fmt(m['first_mask_us_geomean'])} | "
                         f"{_fmt(m['cold_per_token_us_mean_geomean'])} | {_fmt(m['warm_per_token_us_mean_geomean'])} | "
                         f"{_fmt(m['warm_per_token_us_p99_max'])} |")
        rg = sm.get("ratio_outlines_over_llg_geomean")
        if rg:
            lines.append(f"\noutlines-core / llguidance (geomean over schemas): compile {_fmt(rg['compile_first'], 0)}×, "
                         f"µs/token cold {_fmt(rg['cold_per_token_mean'], 2)}×, warm {_fmt(rg['warm_per_token_mean'], 2)}×")
        if t.get("batch"):
            lines.append("")
            lines.append(f"| {BATCH_ROWS} rows, µs per step | mask mean / p99 | consume mean | mask+consume mean |")
            lines.append("|---|---:|---:|---:|")
            for e, br in t["batch"].items():
                for k, v in br.items():
                    if isinstance(v, dict) and "mask_us" in v:
                        lines.append(f"| {e} {k} | {_fmt(v['mask_us']['mean'])} / {_fmt(v['mask_us']['p99'])} | "
                                     f"{_fmt(v['consume_us']['mean'])} | {_fmt(v['step_us']['mean'])} |")
    if doc.get("apply_bitmask"):
        lines.append("\n### apply_bitmask (MLX, float32 logits)\n")
        lines.append("| vocab | B | correct | eager µs mean / p99 | mx.compile(apply_bitmask) µs mean / p99 "
                     "| its first call (trace) ms | eager + np→mx copy µs | argmax alone µs (reference) |")
        lines.append("|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in doc["apply_bitmask"]:
            lines.append(f"| {r['vocab']:,} | {r['B']} | {r['correct']} | {_fmt(r['eager_us']['mean'])} / "
                         f"{_fmt(r['eager_us']['p99'])} | {_fmt(r['compiled_us']['mean'])} / {_fmt(r['compiled_us']['p99'])} | "
                         f"{_fmt(r['compiled_first_call_ms'], 2)} | "
                         f"{_fmt(r['eager_with_np_copy_us']['mean'])} | {_fmt(r['reference_argmax_us']['mean'])} |")
    lines.append("\nExcluded: " + "; ".join(f"{x['engine']}: {x['reason']}" for x in doc["excluded"]))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="HF tokenizer dir (default: SmolLM2 export)")
    ap.add_argument("--stress-tokenizer", default=DEFAULT_STRESS_TOKENIZER,
                    help="a large-vocab tokenizer dir (default: Gemma-3-270m export); skipped if missing")
    ap.add_argument("--no-stress", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="walks per schema and engine, each with a fresh matcher")
    ap.add_argument("--batch-steps", type=int, default=48)
    ap.add_argument("--no-batch", action="store_true")
    ap.add_argument("--compile-timeout-s", type=float, default=90.0,
                    help="per engine and schema (compile twice + walks); the worker is restarted past it")
    ap.add_argument("--second-compile-below-s", type=float, default=3.0,
                    help="compile a second time only if the first took less than this")
    ap.add_argument("--bitmask-iters", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="5 schemas, 2 reps, 16 batch steps, no stress tokenizer")
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.batch_steps, args.no_stress = 2, 16, True

    t_start = time.time()
    check_instances()
    tok_dirs = [("SmolLM2-135M", args.tokenizer)]
    skipped = []
    if not args.no_stress:
        if os.path.exists(os.path.join(args.stress_tokenizer, "tokenizer.json")):
            tok_dirs.append(("Gemma-3-270m", args.stress_tokenizer))
        else:
            skipped.append(f"stress tokenizer {args.stress_tokenizer} missing "
                           "(python -m engine.cli export gemma-3-270m /tmp/gemma-export)")
            log(skipped[-1])
    if not os.path.exists(os.path.join(args.tokenizer, "tokenizer.json")):
        sys.exit(f"{args.tokenizer}/tokenizer.json missing: "
                 f"python -m engine.cli export smollm2-135m-instruct {args.tokenizer} --dequantize")

    import mlx.core as mx

    doc: dict = {
        "benchmark": "bench_grammar",
        "command": "python -m benchmarks.bench_grammar " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {"llguidance": _dist_version("llguidance"), "outlines_core": _dist_version("outlines_core"),
                     "mlx": mx.__version__, "transformers": _dist_version("transformers")},
        "note": ("The CPU may be shared with other work: compare engines by the ratios within this run "
                 "(schemas alternate engine order). p99 is over reps x tokens per schema (~100-400 samples)."),
        "config": {"reps": args.reps, "batch_steps": args.batch_steps, "batch_rows": BATCH_ROWS,
                   "compile_timeout_s": args.compile_timeout_s, "quick": args.quick,
                   "llguidance_options": "grammar_from_json_schema defaults (flexible whitespace), default slices",
                   "outlines_options": "build_regex_from_schema defaults (whitespace [ ]?, max_recursion_depth 3)"},
        "schemas": {n: s for n, (s, _) in SCHEMAS.items()},
        "excluded": EXCLUDED,
        "skipped": skipped,
        "tokenizers": [],
    }
    for label, d in tok_dirs:
        log(f"tokenizer {label}: {d}")
        doc["tokenizers"].append(run_tokenizer(label, d, args))
    log("apply_bitmask in MLX")
    doc["apply_bitmask"] = []
    for t in doc["tokenizers"]:
        doc["apply_bitmask"] += bench_apply_bitmask(t["vocab"], [1, BATCH_ROWS], args.bitmask_iters)
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["wall_s"] = round(time.time() - t_start, 1)
    log(f"done in {doc['wall_s']}s")
    emit(doc, render(doc), args.json_out)


if __name__ == "__main__":
    main()
