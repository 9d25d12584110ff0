"""Vision-language models: images in a chat prompt, encoded at admission, merged into the prompt's
embeddings at prefill; the language model decodes in the same continuous batch as text requests.

`encoder` holds mlx-vlm's side (imported only for a vision model); `prompt` what a request
carries (spans, features, the prefix cache's keys). This module is the engine's seam to them:
`load_vision` at load, `image_prompt` at submit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclass
class Vision:
    """What the engine knows of a model's vision side: its encoder, or why it takes no images."""

    encoder: object | None = None  # engine.vision.encoder.VisionEncoder
    refused: str | None = None  # why images are refused (a family served text only)

    def check(self, model: str, images: list[bytes] | None, parts: int) -> None:
        """Raise InvalidRequestError when this request's images cannot be served."""
        if not images and not parts:
            return
        if self.encoder is None:
            why = self.refused or "it has no vision tower"
            raise InvalidRequestError(f"model {model} does not take images: {why}", param="messages")
        if len(images or ()) != parts:
            raise InvalidRequestError(
                f"{parts} image parts in the messages for {len(images or ())} images", param="images"
            )


def text_embedding(model):
    """The language model's token embedding table (mlx_lm's VLM wrappers and text models)."""
    for owner in (getattr(model, "language_model", None), model):
        inner = getattr(owner, "model", None)
        if inner is not None and hasattr(inner, "embed_tokens"):
            return inner.embed_tokens
    raise AttributeError(f"{type(model).__name__} has no embed_tokens")


def load_vision(loaded, config) -> Vision:
    """The vision side of a loaded model (engine.loading.loader.LoadedModel): none for a text
    model, a refusal (logged) for a family served text only, else its encoder. A vision model
    without mlx-vlm installed is a ModelLoadError naming the extra."""
    from .encoder import VisionEncoder, refusal, vision_family

    if vision_family(loaded.config) is None:
        return Vision()
    why = refusal(loaded.config)
    if why is not None:
        log.warning("%s: %s; its images are refused (400)", loaded.source.original, why)
        return Vision(refused=why)
    embed = text_embedding(loaded.model)
    encoder = VisionEncoder(
        loaded.model_path,
        loaded.config,
        embed,
        loaded.fast_cpu,
        config.max_images,
        int(config.vision_cache_mb * 2**20),
        config.max_image_pixels,
    )
    return Vision(encoder=encoder)
