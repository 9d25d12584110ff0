"""An image prompt inside the engine: where its images' tokens are, what they embed to, and the
ids the prefix cache keys its blocks by.

The language model decodes a prompt with images like any other: its token ids (each image
expanded by the processor into its run of image tokens), except that the prefill reads the
embeddings of those runs from the vision encoder (`merged_embeddings`). The prefix cache keys blocks by
token ids, so an image's run is keyed by ids of its own (`cache_ids`): negative ids (never a real
token) drawn from the image's SHA-256 and the token's place in the run. The chained hash of every
block holding one of them is thereby salted with the image: the same image and prompt hit, another
image shares nothing from its first image block on, and blocks before the first image are keyed by
the text alone (shared with text-only prompts and other images).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import mlx.core as mx


@dataclass
class ImageSpan:
    """One image's run of tokens in the prompt."""

    start: int  # position of its first image token
    length: int  # image tokens in the run
    digest: bytes  # SHA-256 of the image file
    data: bytes | None = None  # the encoded image file, until its features are in
    features: mx.array | None = None  # [length, hidden] in the embedding space, once encoded

    @functools.cached_property
    def keys(self) -> list[int]:
        """The run's cache ids: negative, one per position, drawn from the image's digest."""
        return [
            -1
            - int.from_bytes(hashlib.blake2b(self.digest + j.to_bytes(4, "little"), digest_size=7).digest(), "little")
            for j in range(self.length)
        ]


@dataclass
class VisionPrompt:
    """A request's images: their spans (in order) and the positions mlx-vlm's merge zeroes (pad tokens)."""

    spans: list[ImageSpan]
    zeros: list[int] = field(default_factory=list)

    def cache_ids(self, ids: list[int]) -> list[int]:
        """The prompt's ids as the prefix cache keys them: each image's run replaced by its keys."""
        out = list(ids)
        for s in self.spans:
            out[s.start : s.start + s.length] = s.keys
        return out

    def overrides(self, start: int, k: int) -> list[tuple[int, int, mx.array | None]]:
        """What replaces the token embeddings of positions [start, start + k): (offset in the
        window, count, rows of features, or None for zeros)."""
        out = []
        end = start + k
        for s in self.spans:
            a, b = max(start, s.start), min(end, s.start + s.length)
            if a < b:
                out.append((a - start, b - a, s.features[a - s.start : b - s.start]))
        out += [(p - start, 1, None) for p in self.zeros if start <= p < end]
        return out


def merged_embeddings(embed, chunk: mx.array, rows: list[tuple[VisionPrompt | None, int, int]]) -> mx.array:
    """[B, n, hidden]: a prefill chunk's token embeddings (`embed`, the language model's table)
    with each image row's image features (and zeroed pads) in place. `rows`, one per chunk row:
    its vision prompt (None: text only), the prompt position of its first token in the chunk, and
    its real tokens in the chunk (the rest is padding, never written to its cache)."""
    import mlx.core as mx

    h = embed(chunk)
    out = []
    for i, (vision, start, k) in enumerate(rows):
        row = h[i]
        for offset, count, values in vision.overrides(start, k) if vision is not None else ():
            values = mx.zeros((count, row.shape[-1]), row.dtype) if values is None else values.astype(row.dtype)
            row = mx.concatenate([row[:offset], values, row[offset + count :]], axis=0)
        out.append(row)
    return mx.stack(out)
