"""Images in requests: where they come from, and the checks every one passes before anything is
queued.

The APIs name an image three ways: a `data:` URL (OpenAI `image_url`, Responses `input_image`), a
base64 block (Anthropic, turned into a data URL by its adapter) or an `http(s)` URL. The router
turns each into the image file's bytes here and checks them: within `router.images` limits (count
per request, bytes, pixels), a format Pillow decodes. The bytes travel to the model as they came
(the model's processor decodes them again; its prefix cache keys on their hash).

Fetching is off unless the YAML names hosts (`router.images.allow_hosts`): a server that fetches
any URL a client names is an SSRF hole. An allowed fetch has a timeout and a size cap, and follows
at most MAX_REDIRECTS redirects, each to an allowed host that resolves to public addresses only.
Every problem is a 400 naming the image's field (`messages.0.content.1.image_url`), never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fnmatch
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .errors import ApiError

MAX_REDIRECTS = 3
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageRef:
    """One image of a request, in order of appearance: where it is named, and its URL."""

    param: str
    url: str


@dataclass(frozen=True)
class ImageLimits:
    max_per_request: int = 8
    max_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096
    allow_hosts: tuple[str, ...] = ()
    fetch_timeout_s: float = 10.0


class ImageLoader:
    """Resolves and checks a request's images: `await loader.load(refs)` → their bytes, in order."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits

    async def load(self, refs: list[ImageRef]) -> list[bytes]:
        if not refs:
            return []
        if len(refs) > self.limits.max_per_request:
            raise ApiError(
                400,
                f"{refs[-1].param}: {len(refs)} images in one request; this server takes at most "
                f"{self.limits.max_per_request} (router.images.max_per_request)",
                param=refs[-1].param,
                code="too_many_images",
            )
        out = []
        for ref in refs:
            data = await self._bytes(ref)
            await asyncio.to_thread(check_image, data, ref.param, self.limits)
            out.append(data)
        return out

    async def _bytes(self, ref: ImageRef) -> bytes:
        scheme = ref.url.split(":", 1)[0].lower()
        if scheme == "data":
            return decode_data_url(ref.url, ref.param, self.limits.max_bytes)
        if scheme in ("http", "https"):
            return await self._fetch(ref)
        raise ApiError(400, f"{ref.param}: an image URL must be a data: URL or an http(s) URL", param=ref.param)

    async def _fetch(self, ref: ImageRef) -> bytes:
        import httpx

        url = ref.url
        if not self.allowed(url):
            raise ApiError(
                400,
                f"{ref.param}: fetching images from {urlsplit(url).hostname or url!r} is not allowed on this "
                "server; send the image as a data: URL (base64), or have the operator add the host to "
                "router.images.allow_hosts",
                param=ref.param,
                code="image_url_not_allowed",
            )
        try:
            async with httpx.AsyncClient(timeout=self.limits.fetch_timeout_s, follow_redirects=False) as client:
                for hop in range(MAX_REDIRECTS + 1):
                    async with client.stream("GET", url) as response:
                        if response.is_redirect and hop < MAX_REDIRECTS:
                            url = await self._redirect(ref, url, response.headers.get("location", ""))
                            continue
                        if response.status_code != 200:
                            raise ApiError(
                                400,
                                f"{ref.param}: fetching the image gave HTTP {response.status_code}",
                                param=ref.param,
                            )
                        return await self._read(ref, response)
        except httpx.HTTPError as exc:
            raise ApiError(
                400, f"{ref.param}: the image could not be fetched ({type(exc).__name__})", param=ref.param
            ) from None
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _redirect(self, ref: ImageRef, url: str, location: str) -> str:
        target = urljoin(url, location)
        host = urlsplit(target).hostname or ""
        if urlsplit(target).scheme not in ("http", "https") or not self.allowed(target):
            raise ApiError(400, f"{ref.param}: the image URL redirects to a host that is not allowed", param=ref.param)
        if not await asyncio.to_thread(resolves_public, host):
            raise ApiError(400, f"{ref.param}: the image URL redirects to a private address", param=ref.param)
        return target

    async def _read(self, ref: ImageRef, response) -> bytes:
        cap = self.limits.max_bytes
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise _too_large(ref.param, int(declared), cap)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > cap:
                raise _too_large(ref.param, len(data), cap)
        return bytes(data)

    def allowed(self, url: str) -> bool:
        """The URL's host is on the allow-list (an exact name, or a pattern such as *.example.com)."""
        host = (urlsplit(url).hostname or "").lower()
        return bool(host) and any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in self.limits.allow_hosts)


def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """`data:image/png;base64,....` → the file's bytes (base64 only: images are binary)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ApiError(400, f"{param}: a data: URL must be data:<media type>;base64,<data>", param=param)
    if len(payload) * 3 // 4 > max_bytes:
        raise _too_large(param, len(payload) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the data: URL's base64 does not decode", param=param) from None


def check_image(data: bytes, param: str, limits: ImageLimits) -> None:
    """Raises a 400 naming `param` unless `data` is one image Pillow decodes, in a known format,
    within the byte and pixel limits (the pixel count is read from the header before decoding:
    no decompression bomb is ever expanded)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise _too_large(param, len(data), limits.max_bytes)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise ApiError(
                    400, f"{param}: {image.format} images are not supported ({', '.join(FORMATS)} are)", param=param
                )
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ApiError(
                    400,
                    f"{param}: the image is {width}x{height}, more than {limits.max_pixels} pixels "
                    "(router.images.max_pixels)",
                    param=param,
                    code="image_too_large",
                )
            image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise ApiError(400, f"{param}: not a decodable image", param=param, code="invalid_image") from None


def resolves_public(host: str) -> bool:
    """Every address `host` resolves to is a public one (not private, loopback, link-local,
    reserved or multicast)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            return False
    return bool(infos)


def _too_large(param: str, size: int, cap: int) -> ApiError:
    return ApiError(
        400,
        f"{param}: the image is {size} bytes, more than {cap} (router.images.max_bytes)",
        param=param,
        code="image_too_large",
    )
