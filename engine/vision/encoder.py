"""A vision-language model's vision side, from mlx-vlm: its processor (image preprocessing and the
prompt's image-token expansion), its vision tower and projector, and its family's way of turning
their output into embeddings the language model reads. The language model itself is mlx_lm's,
loaded by engine.loading like any text model; mlx-vlm's copy of it is never evaluated (its
checkpoint is opened lazily and only the vision modules are kept).

mlx-vlm is an optional dependency (`pip install '.[vision]'`), imported only here, only for a
model whose config has a vision tower of a family served (`FAMILIES`). Families whose image
tokens need positions mlx_lm's text model does not compute (Qwen-VL's M-RoPE) are `REFUSED`:
their text is served, their images are a 400.

Encoder outputs are cached by the image file's SHA-256, least recently used first out, within
`cache_bytes` (counted in the model's footprint).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import InvalidRequestError, ModelLoadError
from .prompt import ImageSpan, VisionPrompt

log = logging.getLogger(__name__)

# mlx-vlm model types served with images: the language model's positions are 1-D (plain RoPE).
FAMILIES = ("gemma3",)
# Families whose image tokens take 3-D M-RoPE positions that mlx_lm's text model cannot be given.
REFUSED = {
    t: "its image tokens take M-RoPE (3-D) positions, which the language model here does not compute"
    for t in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "glm4v_moe")
}


def vision_family(config: dict) -> str | None:
    """The model's vision family (its model type) when its config has a vision tower, else None."""
    return config.get("model_type") if isinstance(config.get("vision_config"), dict) else None


def refusal(config: dict) -> str | None:
    """Why this model takes no images (None: it takes them, or has no vision tower)."""
    family = vision_family(config)
    if family is None or family in FAMILIES:
        return None
    return f"{family} models are served text only here: {REFUSED.get(family, 'its vision side is not supported')}"


class VisionEncoder:
    """The vision tower of one loaded model (the engine's loop thread runs `encode`)."""

    def __init__(
        self,
        model_path: Path,
        config: dict,
        embed,
        fast_cpu: bool,
        max_images: int,
        cache_bytes: int,
        max_image_pixels: int = 2**25,
    ):
        try:
            from mlx_vlm.utils import load_model, load_processor
        except ImportError as exc:
            raise ModelLoadError(
                f"{model_path} is a vision model ({vision_family(config)}): install the vision extra, "
                f"pip install '.[vision]' ({exc})"
            ) from None
        import mlx.core as mx

        from ..loading.loader import to_float32, weights_nbytes

        self.family = vision_family(config)
        vlm = load_model(Path(model_path), lazy=True)  # the language model's weights are never read
        self.processor = load_processor(model_path, add_detokenizer=False)
        self.tower, self.projector = vlm.vision_tower, vlm.multi_modal_projector
        self.hidden_size = vlm.config.hidden_size  # what mlx-vlm's merge divides the features by
        self.image_token = vlm.config.image_token_index
        self.pad_token = vlm.config.pad_token_id
        self.image_size = vlm.config.vision_config.image_size
        del vlm
        if fast_cpu:
            to_float32(self.tower)
            to_float32(self.projector)
        mx.eval(self.tower.parameters(), self.projector.parameters())
        self.embed = embed
        self.dtype = embed.weight.dtype if hasattr(embed, "weight") else mx.float32
        self.weights_bytes = weights_nbytes(self.tower) + weights_nbytes(self.projector)
        self.max_images = max_images
        self.max_image_pixels = max_image_pixels
        self.cache_bytes = cache_bytes
        self.image_bytes = 0  # one image's features (measure_working_bytes)
        self.cache: OrderedDict[bytes, mx.array] = OrderedDict()
        self.counters = {"hits": 0, "misses": 0}

    # --- requests (any thread: no MLX compute) ------------------------------------------

    def prepare(self, text: str, images: list[bytes]) -> tuple[list[int], VisionPrompt]:
        """A rendered chat prompt with one image marker per image → its token ids, each image
        expanded into its run of image tokens (mlx-vlm's processor), and where the runs are.
        Raises InvalidRequestError naming the image at fault."""
        from mlx_vlm.utils import load_image, prepare_inputs

        if len(images) > self.max_images:
            raise InvalidRequestError(
                f"this model takes at most {self.max_images} images per request; got {len(images)}",
                param=f"images[{self.max_images}]",
            )
        pictures = [self._decode(i, data, load_image) for i, data in enumerate(images)]
        inputs = prepare_inputs(self.processor, images=pictures, prompts=[text], image_token_index=self.image_token)
        ids = inputs["input_ids"][0].tolist()
        runs = _runs(ids, self.image_token)
        if len(runs) != len(images) or inputs["pixel_values"].shape[0] != len(images):
            raise InvalidRequestError(
                f"the prompt renders {len(runs)} images for the {len(images)} given", param="messages"
            )
        if ids[-1] == self.image_token:
            raise InvalidRequestError("a prompt cannot end inside an image", param="messages")
        # a span keeps the encoded file, not its pixels (a waiting request holds no float images):
        # the loop thread preprocesses it again if the encoder cache does not have it
        spans = [
            ImageSpan(start, length, hashlib.sha256(data).digest(), data) for (start, length), data in zip(runs, images)
        ]
        zeros = [p for p, t in enumerate(ids) if t == self.pad_token]
        return ids, VisionPrompt(spans, zeros)

    def _decode(self, i: int, data: bytes, load_image):
        """images[i] as an RGB picture; its header is read first, so an image past
        `max_image_pixels` is refused before it is decoded."""
        from PIL import Image

        try:
            picture = Image.open(io.BytesIO(data))
            width, height = picture.size
            if width * height > self.max_image_pixels:
                raise InvalidRequestError(
                    f"images[{i}] is {width}x{height} pixels; this model takes at most {self.max_image_pixels} pixels",
                    param=f"images[{i}]",
                )
            return load_image(picture)
        except InvalidRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL's many errors: the image is at fault
            raise InvalidRequestError(f"images[{i}] could not be decoded: {exc}", param=f"images[{i}]") from None

    # --- the loop thread ----------------------------------------------------------------

    def encode(self, prompt: VisionPrompt, after: int = 0) -> None:
        """Fill in the features of each span that ends past position `after` (the prompt's cached
        tokens: a span they hold whole is never read): from the encoder cache, else through the
        vision tower."""
        import mlx.core as mx

        for span in prompt.spans:
            if span.features is not None or span.start + span.length <= after:
                continue
            features = self.cache.get(span.digest)
            if features is not None and features.shape[0] == span.length:
                self.cache.move_to_end(span.digest)
                self.counters["hits"] += 1
            else:
                self.counters["misses"] += 1
                features = self._features(self._pixels(span.data))
                if features.shape[0] != span.length:
                    raise InvalidRequestError(
                        f"the image gives {features.shape[0]} features for its {span.length} tokens", param="images"
                    )
                mx.eval(features)
                self._keep(span.digest, features)
            span.features, span.data = features, None

    def _pixels(self, data: bytes):
        """[1, C, H, W]: one image as the processor makes it (its image processor treats each image
        of a prompt alone: the same pixels as prepare's)."""
        import mlx.core as mx
        from mlx_vlm.utils import load_image
        from PIL import Image

        pixels = self.processor.image_processor(load_image(Image.open(io.BytesIO(data))))["pixel_values"]
        return mx.array(np.asarray(pixels))

    def _features(self, pixels):
        """[tokens, hidden]: one image's embeddings, as the family's merge puts them in the prompt."""
        return FEATURES[self.family](self, pixels)

    def _keep(self, digest: bytes, features) -> None:
        self.cache[digest] = features
        while self.cache and sum(f.nbytes for f in self.cache.values()) > self.cache_bytes:
            self.cache.popitem(last=False)

    def measure_working_bytes(self) -> int:
        """Peak transient MLX memory of one image at the largest size the model takes (its
        processor resizes every image to it), above what was held before."""
        import mlx.core as mx

        pixels = mx.zeros((1, 3, self.image_size, self.image_size), dtype=self.dtype)
        mx.eval(pixels)
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        features = self._features(pixels)
        mx.eval(features)
        peak = max(0, mx.get_peak_memory() - base)
        self.image_bytes = features.nbytes
        del features
        mx.clear_cache()
        return peak

    def stats(self) -> dict:
        cached = sum(f.nbytes for f in self.cache.values())
        return {
            "family": self.family,
            "max_images": self.max_images,
            "max_image_pixels": self.max_image_pixels,
            "encoder_cache": {"entries": len(self.cache), "bytes": cached, **self.counters},
        }


def _gemma3_features(encoder: VisionEncoder, pixels):
    """mlx-vlm's gemma3 (`Model.get_input_embeddings`, `prepare_inputs_for_multimodal`): the tower
    over NHWC pixels in the embeddings' dtype, the projector, divided by sqrt(hidden) (the language
    model multiplies every input embedding back)."""
    hidden, _, _ = encoder.tower(pixels.transpose(0, 2, 3, 1).astype(encoder.dtype), output_hidden_states=True)
    features = encoder.projector(hidden)
    return (features / (encoder.hidden_size**0.5))[0].astype(encoder.dtype)


# family -> its image features as the language model reads them; one entry per family in FAMILIES
FEATURES = {"gemma3": _gemma3_features}


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each run of `token` in `ids`."""
    runs: list[tuple[int, int]] = []
    for p, t in enumerate(ids):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def image_parts(messages: list[dict] | None) -> int:
    """How many `{"type": "image"}` parts the messages hold."""
    n = 0
    for m in messages or ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image")
    return n
