"""The grammar engines of benchmarks/lab/bench_grammar.py behind one adapter each, and the worker
process that runs one engine (so that a compile that runs away can be stopped)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

BATCH_ROWS = 16


class _LLGuidance:
    name = "llguidance"

    def __init__(self, hf_tok):
        import llguidance
        import llguidance.hf

        t0 = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(hf_tok)
        self.setup_s = time.perf_counter() - t0
        self.version = llguidance.__version__ if hasattr(llguidance, "__version__") else dist_version("llguidance")
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
        self.version = dist_version("outlines_core")
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


def dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def stats_us(ns: list[int]) -> dict:
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
        "new_state_us": stats_us(new_ns),
        "first_mask_us": stats_us(first_mask_ns),
        "mask_us": stats_us(mask_ns),
        "consume_us": stats_us(consume_ns),
        "per_token_us": stats_us(step_ns),
        "cold_per_token_us": stats_us(cold_ns),
        "warm_per_token_us": stats_us(warm_ns),
        "allowed_tokens_min": min(allowed_counts) if allowed_counts else None,
        "allowed_tokens_max": max(allowed_counts) if allowed_counts else None,
    }


class _RowSet:
    """A batch's rows, each walking its own path and starting again with a fresh state when done.
    Rows start staggered along their paths (the prefix consumed untimed)."""

    def __init__(self, eng, arts: dict, rows: list[tuple[str, list[int]]]):
        self.eng, self.arts, self.rows = eng, arts, rows
        self.states = [eng.new_state(arts[name]) for name, _ in rows]
        self.pos = [(i * 5) % len(path) for i, (_, path) in enumerate(rows)]
        for i, st in enumerate(self.states):
            for tok in rows[i][1][: self.pos[i]]:
                eng.consume(st, tok)

    def next_tokens(self) -> list[int]:
        return [path[self.pos[i]] for i, (_, path) in enumerate(self.rows)]

    def advance(self) -> None:
        for i, (name, path) in enumerate(self.rows):
            self.pos[i] += 1
            if self.pos[i] == len(path):
                self.states[i] = self.eng.new_state(self.arts[name])
                self.pos[i] = 0


def _timings(mask_ns: list[int], consume_ns: list[int]) -> dict:
    return {
        "mask_us": stats_us(mask_ns),
        "consume_us": stats_us(consume_ns),
        "step_us": stats_us([a + c for a, c in zip(mask_ns, consume_ns)]),
    }


def _sequential_step(eng, rows: _RowSet, base: int, stride: int) -> tuple[int, int]:
    """Each row's mask into its line of the bitmask, then each row's token: (mask ns, consume ns)."""
    toks = rows.next_tokens()
    t0 = time.perf_counter_ns()
    for i, st in enumerate(rows.states):
        eng.fill(st, base + i * stride, stride)
    t1 = time.perf_counter_ns()
    for i, st in enumerate(rows.states):
        eng.consume(st, toks[i])
    t2 = time.perf_counter_ns()
    rows.advance()
    return t1 - t0, t2 - t1


def _parallel_step(executor, rows: _RowSet, bitmask) -> tuple[int, int, bool]:
    """llguidance's parallel fill and consume over the batch: (mask ns, consume ns, all consumed)."""
    import llguidance.numpy as lln

    toks = rows.next_tokens()
    t0 = time.perf_counter_ns()
    lln.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(rows.states)], bitmask)
    t1 = time.perf_counter_ns()
    res = lln.consume_token_par(executor, list(zip(rows.states, toks)))
    t2 = time.perf_counter_ns()
    rows.advance()
    return t1 - t0, t2 - t1, all(res)


def _batch(eng, arts: dict, rows: list[tuple[str, list[int]]], steps: int, threads: list[int | None]) -> dict:
    """16 rows, each walking its own path; sequential masks, and llguidance's parallel ones (which
    must give the same bitmask) at each thread count."""
    import numpy as np

    words = (eng.vocab + 31) // 32
    b = len(rows)
    seq = _RowSet(eng, arts, rows)
    bm_seq = np.zeros((b, words), dtype=np.int32)
    par_sets, execs = {}, {}
    if eng.name == "llguidance":
        import llguidance

        for t in threads:
            execs[t] = llguidance.LLExecutor() if t is None else llguidance.LLExecutor(num_threads=t)
            par_sets[t] = _RowSet(eng, arts, rows)
    bm_par = np.zeros((b, words), dtype=np.int32)
    seq_ns: tuple[list, list] = ([], [])
    par_ns = {t: ([], []) for t in par_sets}
    mismatches = 0
    for _ in range(steps):
        for got, into in zip(_sequential_step(eng, seq, bm_seq.ctypes.data, words * 4), seq_ns):
            into.append(got)
        for t, ps in par_sets.items():
            mask, cons, ok = _parallel_step(execs[t], ps, bm_par)
            par_ns[t][0].append(mask)
            par_ns[t][1].append(cons)
            mismatches += not ok or not np.array_equal(bm_par, bm_seq)
    out: dict = {"rows": b, "steps": steps, "schemas": [n for n, _ in rows], "sequential": _timings(*seq_ns)}
    for t in par_sets:
        out[f"parallel_threads_{'default' if t is None else t}"] = _timings(*par_ns[t])
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
    conn.send(("ready", {"setup_s": round(eng.setup_s, 3), "version": eng.version, "vocab": eng.vocab, "eos": eng.eos}))
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
