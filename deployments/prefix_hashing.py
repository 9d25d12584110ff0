"""A prompt's prefix as both sides of prefix affinity key it: the text a request's prompt renders
to, and chained hashes of that text's fixed-size blocks.

The request router (router process) hashes what it sends; each model replica
(`prefix_residency`) hashes the same text again to report which blocks its cache holds. Both
import this module and nothing of each other. The hashes are deterministic across processes
(blake2b, not Python's salted `hash`): replicas report them back to every router.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .hop import GenerateRequest


def prompt_text(request: Any) -> str | None:
    """The text whose prefix decides a `GenerateRequest`'s replica, in the order the chat template
    renders it, after the request's adapter if it names one; None for anything else (the
    arguments of other calls)."""
    if not isinstance(request, GenerateRequest):
        return None
    prompt = request.prompt
    # an adapter changes K/V from the first token on: the same prompt under another adapter is another prefix
    parts: list[str] = [f"\x02adapter:{request.adapter}"] if request.adapter else []
    if prompt.tools:
        parts.append(f"\x02tools:{prompt.tools!r}")  # templates render tools before the messages
    if prompt.messages is not None:
        images = iter(prompt.images or ())
        for message in prompt.messages:
            if isinstance(message, dict):
                parts.append(f"\x02{message.get('role')}:{_content_text(message.get('content'), images)}")
    elif prompt.text is not None:
        parts.append(str(prompt.text))
    elif prompt.token_ids is not None:
        parts.append(",".join(str(t) for t in prompt.token_ids) + ",")
    return "".join(parts) or None


def _content_text(content: Any, images) -> str:
    """A message's text; an image part stands as a digest of its bytes (the next of `images`), so
    the same text with another image is another prefix."""
    if isinstance(content, str) or content is None:
        return content or ""
    if isinstance(content, list):  # content parts
        return "".join(_part_text(p, images) for p in content)
    return str(content)


def _part_text(part: Any, images) -> str:
    if not isinstance(part, dict):
        return str(part)
    if part.get("type") == "image":
        return f"\x03image:{hashlib.blake2b(next(images, b''), digest_size=8).hexdigest()}"
    return part.get("text", "")


def block_hashes(text: str, block_chars: int) -> list[int]:
    """Chained hashes of the text's full blocks: block i's hash covers the whole prefix up to it,
    as the engine's block hashes do (a partial last block is never shared, so it is left out).
    Deterministic across processes (not Python's salted `hash`): replicas report them back."""
    out, parent = [], b""
    for end in range(block_chars, len(text) + 1, block_chars):
        block = text[end - block_chars : end].encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + block, digest_size=8).digest()
        out.append(int.from_bytes(parent, "little", signed=True))
    return out
