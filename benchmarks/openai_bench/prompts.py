"""The prompts: the seed's five questions, a long shared system prompt, the prefix-cache steps.

Every run draws a fresh nonce into the cached texts, so a second run against the same server
starts cold instead of hitting the first run's cache.
"""

from __future__ import annotations

SEED_QUESTIONS = ["What is 2+2?", "Name 3 colors.", "What is Python?", "Capital of Japan?", "Who wrote Hamlet?"]
# The same questions asking for long answers: a server that ignores `ignore_eos` still produces
# max_tokens tokens (SmolLM2 answers "Capital of Japan?" in 8 tokens, these in 64+).
DETAILED_QUESTIONS = [
    "Explain in detail what 2+2 is.",
    "Describe 3 colors in detail.",
    "Explain in detail what Python is.",
    "Describe the capital of Japan in detail.",
    "Explain in detail who wrote Hamlet.",
]
PROMPT_SETS = {"seed": SEED_QUESTIONS, "detailed": DETAILED_QUESTIONS}

_RULES = [
    "Answer the customer politely and keep the answer short",
    "Quote the order number whenever the customer gives one",
    "Never promise a refund before the warehouse has confirmed the return",
    "Offer the express shipping upgrade only to members of the loyalty program",
    "Explain the warranty terms in plain words and avoid legal jargon",
    "Escalate complaints about damaged goods to a human supervisor",
    "Recommend the size guide when the customer asks about fitting",
]
_TOPICS = ["shipping", "returns", "warranty", "payments", "accounts", "sizes", "gift cards", "repairs"]


def chat(question: str, system: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": question}]


def seed_messages(i: int, prompt_set: str = "seed") -> list[dict]:
    qs = PROMPT_SETS[prompt_set]
    return chat(qs[i % len(qs)])


def system_prompt(nonce: str, words: int = 340) -> str:
    """A support-desk system prompt of about `words` words (~1.3 tokens a word with SmolLM2's and
    Gemma's tokenizers, so the default is ~500 tokens)."""
    parts = [f"You are the support assistant of shop {nonce}. Follow these rules."]
    n = 0
    while sum(len(p.split()) for p in parts) < words:
        topic = _TOPICS[n % len(_TOPICS)]
        parts.append(f"Rule {n + 1} ({topic}): {_RULES[n % len(_RULES)]}.")
        n += 1
    return " ".join(parts)


USER_QUESTIONS = [
    "Where is my parcel?",
    "Can I return a gift?",
    "How long is the warranty?",
    "Do you ship to Norway?",
    "My card was charged twice.",
    "How do I reset my password?",
    "Which size should I order?",
    "Can I pay with a gift card?",
    "The zipper broke, what now?",
    "Can I change my address?",
    "Is express shipping free?",
    "How do I cancel an order?",
    "Do you price match?",
    "Where is the size guide?",
    "Can I buy a gift card online?",
    "How do I contact a human?",
]


# Openers with distinct first letters: prompt A and prompt B of a run start with different words,
# and a later run on the same server most likely starts with words the cache has never seen.
OPENERS = [
    "Amber",
    "Badger",
    "Cobalt",
    "Dolphin",
    "Ember",
    "Falcon",
    "Granite",
    "Heron",
    "Indigo",
    "Juniper",
    "Kestrel",
    "Lagoon",
    "Marble",
    "Nutmeg",
    "Orchid",
    "Pebble",
    "Quartz",
    "Saffron",
    "Tundra",
    "Umber",
    "Violet",
    "Walrus",
    "Yarrow",
    "Zephyr",
]


def openers(nonce: str) -> tuple[str, str]:
    i = int.from_bytes(nonce.encode(), "big") % len(OPENERS)
    return OPENERS[i], OPENERS[(i + len(OPENERS) // 2) % len(OPENERS)]


def prefix_steps(nonce: str) -> list[dict]:
    """The seed's prefix-cache table, sent to /v1/completions as raw text (no chat template, whose
    shared head would turn every "different prompt" into a prefix hit). Prompts A and B start with
    different words, drawn per run. A is long enough (~230 tokens) for block-based caches to hold it."""
    word_a, word_b = openers(nonce)
    doc = system_prompt(nonce, words=150)
    a = f"{word_a} handbook {nonce}. {doc}\nQuestion: Where is my parcel?\nAnswer:"
    b = f"{word_b} bread {nonce[::-1]}: bake flour, water, salt and yeast for forty minutes.\nStep one:"
    a2 = f"{word_a} handbook {nonce}. {doc}\nQuestion: How long is the warranty?\nAnswer:"
    return [
        {"step": 1, "description": "First request (prompt A)", "expected": "MISS", "prompt": a},
        {"step": 2, "description": "Same prompt A again", "expected": "HIT", "prompt": a},
        {"step": 3, "description": "Different prompt B", "expected": "MISS", "prompt": b},
        {"step": 4, "description": "Back to prompt A", "expected": "HIT", "prompt": a},
        {"step": 5, "description": "A's long prefix, another question", "expected": "PREFIX_HIT", "prompt": a2},
    ]
