"""The router's side of the router → model hop.

A ModelClient starts a streaming call on one model and hands back a ModelCall: an async iterator
of `hop.Chunk` items (see model_server.py) that turns error items, Ray failures and the request deadline
into ApiErrors, records latencies for the metrics, and cancels the remote stream on close — which
aborts the request in the engine when the HTTP client went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, Protocol

from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from engine.request import PromptInput

from .config import RouterConfig
from .gather import Gatherer
from .hop import Embeddings, EmbedRequest, GenerateRequest
from .http.errors import ApiError

log = logging.getLogger("ray.serve")
AdapterMethod = Literal["adapter_states", "load_adapter", "unload_adapter"]  # ModelServer's adapter calls


class ModelCall:
    """One running request. Iterate for chunks; always `await close()` (idempotent)."""

    def __init__(
        self,
        model: str,
        items: AsyncIterator[dict],
        cancel: Callable[[], None],
        started_at: float,
        deadline: float,
        retry_after_s: int = 1,
        load_timeout_s: float | None = None,
    ):
        """`load_timeout_s`: the model is not loaded; its first chunk must come within this long
        (it covers the load and waiting for room in the memory budget), else 503."""
        self.model, self.started_at, self.deadline = model, started_at, deadline
        self.load_timeout_s = load_timeout_s
        self._items, self._cancel, self._retry_after_s = items, cancel, retry_after_s
        self._first: dict | None = None
        self.done = False
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.gaps: list[tuple[float, int]] = []  # (seconds since the previous chunk, tokens in this chunk)
        self.usage: dict | None = None
        self.request_id: str | None = None
        self.prompt_tokens: int | None = None  # known from the first chunk on (before the usage)

    async def begin(self) -> ModelCall:
        """Wait for the first chunk, so that a refused request becomes an HTTP error, not a stream."""
        try:
            self._first = await self._next(self._load_deadline())
        except BaseException:
            await self.close()
            raise
        return self

    def _load_deadline(self) -> float | None:
        if self.load_timeout_s is None:
            return None
        return min(self.deadline, self.started_at + self.load_timeout_s)

    async def _next(self, load_deadline: float | None = None) -> dict | None:
        deadline = load_deadline or self.deadline
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):  # no task per chunk, as wait_for would make
                item = await self._items.__anext__()
        except StopAsyncIteration:
            self.done = True
            return None
        except TimeoutError:
            if load_deadline is not None and load_deadline < self.deadline:
                raise load_timeout_error(self.model, self.load_timeout_s, self._retry_after_s) from None
            raise deadline_error(self.started_at, self.deadline) from None
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - Ray failures become API errors
            raise ray_error(self.model, exc, self._retry_after_s) from exc
        if "error" in item:
            self.done = True
            raise ApiError.from_item(item, self._retry_after_s)
        self._observe(item)
        return item

    def _observe(self, item: dict) -> None:
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self.request_id = item.get("request_id")
            self.prompt_tokens = item.get("prompt_tokens")
        elif item["n_tokens"]:
            self.gaps.append((now - (self.last_token_at or now), item["n_tokens"]))
        if item["n_tokens"]:
            self.last_token_at = now
        if item.get("finish_reason") is not None:
            self.usage = item.get("usage")
            self.done = True

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[dict]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
            if first.get("finish_reason") is not None:
                return
        while not self.done:
            item = await self._next()
            if item is None:
                return
            yield item

    async def close(self) -> None:
        """Cancel the remote stream unless it already finished (the engine then aborts the request)."""
        if not self.done:
            self.done = True
            try:
                self._cancel()
            except Exception:  # noqa: BLE001 - best effort
                log.debug("cancelling a model stream failed", exc_info=True)


START_ATTEMPTS = 3  # a request is sent at most this often while its replicas are lost before any output


def replica_lost(err: ApiError) -> bool:
    """Whether a call failed because its replica died or became unreachable (not the request's fault)."""
    return isinstance(err.__cause__, (RayActorError, ReplicaUnavailableError))


def load_timeout_error(model: str, load_timeout_s: float, retry_after_s: int = 1) -> ApiError:
    return ApiError(
        503,
        f"model {model!r} is not loaded and could not be loaded within its load_timeout_s "
        f"({load_timeout_s:g} s): it is loading, or the memory budget is held by busy models; retry later",
        type="server_error",
        code="model_loading",
        headers={"Retry-After": str(retry_after_s)},
    )


def deadline_error(started_at: float, deadline: float) -> ApiError:
    return ApiError(
        504,
        f"the request took longer than the router's request_timeout_s ({deadline - started_at:.0f} s)",
        type="timeout_error",
        code="timeout",
    )


def wrong_kind_error(model: str, kind: str) -> ApiError:
    """A request for a model of the other kind: an embedding model at a generation endpoint, a
    chat model at /v1/embeddings."""
    if kind == "embedding":
        message = f"model {model!r} is an embedding model: use it with POST /v1/embeddings"
    else:
        message = f"model {model!r} is a chat model, not an embedding model: use it with a generation endpoint"
    return ApiError(400, message, param="model", code="model_not_supported")


def ray_error(model: str, exc: BaseException, retry_after_s: int = 1) -> ApiError:
    """A failure of the hop (Ray Serve's own queue limits included) as an ApiError (each API answers it in its own shape)."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, BackPressureError):
        if exc.retry_after_s:
            retry = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return ApiError(
            exc.status_code,
            f"model {model!r} is overloaded (queue full); retry later",
            type="overloaded_error",
            code="overloaded",
            headers=retry,
        )
    if isinstance(exc, (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)):
        return ApiError(
            503,
            f"model {model!r} is unavailable right now: {type(exc).__name__}",
            type="server_error",
            code="model_unavailable",
            headers=retry,
        )
    if isinstance(exc, RequestCancelledError):
        return ApiError(499, "the request was cancelled", type="server_error", code="cancelled")
    log.error("model %s failed: %r", model, exc)
    return ApiError(500, f"model {model!r} failed: {type(exc).__name__}", type="server_error")


class ModelClient(Protocol):
    name: str
    kind: Literal["chat", "embedding"]

    async def start(
        self, request: GenerateRequest, started_at: float, deadline: float, load_timeout_s: float | None = None
    ) -> ModelCall: ...

    async def stats(self, timeout_s: float) -> dict[str, Any]: ...

    async def health(self, timeout_s: float) -> None: ...

    async def info(self, timeout_s: float) -> dict[str, Any]: ...

    async def request_unload(self, timeout_s: float) -> dict[str, Any]: ...

    async def count_tokens(self, prompt: PromptInput, timeout_s: float, load: bool = False) -> int: ...

    async def adapters(self, method: AdapterMethod, timeout_s: float, *args: str) -> dict[str, Any]: ...


async def _resolve(response):
    return await response


async def _wait(response, timeout_s: float):
    return await asyncio.wait_for(_resolve(response), timeout_s)


class RayModelClient:
    """A ModelClient over a ModelServer's DeploymentHandle (the streaming handle is made once).
    `gather`: requests that come while one is on its way go together (deployments.gather)."""

    kind: Literal["chat", "embedding"] = "chat"

    def __init__(self, name: str, handle, config: RouterConfig, gather: bool = False):
        self.name = name
        self.deployment = getattr(handle, "deployment_name", None)  # the model's Ray Serve deployment
        self._handle = handle
        self._stream = handle.options(stream=True, method_name="generate")
        self._gatherer = Gatherer(handle) if gather else None
        self._retry_after_s = config.retry_after_s

    async def start(
        self, request: GenerateRequest, started_at: float, deadline: float, load_timeout_s: float | None = None
    ) -> ModelCall:
        """The call once its first chunk is there. A request whose replica was lost before that
        chunk (its node died, it is unreachable) is sent again, to another replica: nothing of it
        reached the client yet. Once output has streamed, a lost replica ends the stream with an
        error instead (the client has part of an answer)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            sent = request if attempt == 1 else request.resent(attempt)
            try:
                gen = self._stream.remote(sent) if self._gatherer is None else self._gatherer.open(sent)
            except Exception as exc:  # noqa: BLE001 - any Ray failure becomes an API error
                raise ray_error(self.name, exc, self._retry_after_s) from exc
            call = ModelCall(self.name, gen, gen.cancel, started_at, deadline, self._retry_after_s, load_timeout_s)
            try:
                return await call.begin()
            except ApiError as err:
                if attempt == START_ATTEMPTS or not replica_lost(err) or time.monotonic() >= deadline:
                    raise
                log.warning(
                    "model %s: its replica was lost before the first token (%s); sending the request "
                    "again (attempt %d of %d)",
                    self.name,
                    type(err.__cause__).__name__,
                    attempt + 1,
                    START_ATTEMPTS,
                )
        raise AssertionError("unreachable")

    async def _call(self, method: str, timeout_s: float, *args: Any, load: bool = False):
        response = getattr(self._handle, method).remote(*args)
        try:
            return await _wait(response, timeout_s)
        except TimeoutError:
            response.cancel()
            if load:
                raise load_timeout_error(self.name, timeout_s, self._retry_after_s) from None
            raise ApiError(
                504,
                f"model {self.name!r} did not answer {method} within {timeout_s:g} s",
                type="timeout_error",
                code="timeout",
            ) from None
        except Exception as exc:  # noqa: BLE001 - any Ray failure becomes an API error
            raise ray_error(self.name, exc, self._retry_after_s) from exc

    async def stats(self, timeout_s: float) -> dict[str, Any]:
        return await self._call("stats", timeout_s)

    async def health(self, timeout_s: float) -> None:
        await _wait(self._handle.check_health.remote(), timeout_s)

    async def info(self, timeout_s: float, load: bool = False) -> dict[str, Any]:
        """The replica's info; on an unloaded model this loads it (`load`: a timeout is then a 503)."""
        return await self._call("info", timeout_s, load=load)

    async def request_unload(self, timeout_s: float) -> dict[str, Any]:
        return await self._call("request_unload", timeout_s)

    async def count_tokens(self, prompt: PromptInput, timeout_s: float, load: bool = False) -> int:
        """The prompt's token count through the model's chat template, without generating."""
        result = await self._call("count_tokens", timeout_s, prompt, load=load)
        if "error" in result:
            raise ApiError.from_item(result, self._retry_after_s)
        return int(result["input_tokens"])

    async def adapters(self, method: AdapterMethod, timeout_s: float, *args: str) -> dict[str, Any]:
        """A loaded model's LoRA adapters: `adapter_states()`, or `load_adapter(name)` /
        `unload_adapter(name)` (its state); a refusal of the replica as an ApiError."""
        result = await self._call(method, timeout_s, *args)
        if "error" in result and "status_code" in result:
            raise ApiError.from_item(result, self._retry_after_s)
        return result


class RayEmbeddingClient(RayModelClient):
    """A ModelClient over an EmbeddingServer's DeploymentHandle: `embed` instead of generating."""

    kind: Literal["chat", "embedding"] = "embedding"

    async def start(self, request, started_at, deadline, load_timeout_s=None) -> ModelCall:
        raise wrong_kind_error(self.name, self.kind)

    async def count_tokens(self, prompt: PromptInput, timeout_s: float, load: bool = False) -> int:
        raise wrong_kind_error(self.name, self.kind)

    async def embed(
        self,
        request: EmbedRequest,
        started_at: float,
        deadline: float,
        load_timeout_s: float | None = None,
        loaded: Callable[[], bool] = lambda: True,
    ) -> Embeddings:
        """The request's vectors. `load_timeout_s`: the model is not loaded; unless it is loaded by
        then (`loaded()`), the answer must come within this long, else 503. A request whose replica
        was lost is sent again (embedding is idempotent), at most START_ATTEMPTS times in all."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                answer = await self._embed_once(request, started_at, deadline, load_timeout_s, loaded)
            except ApiError as err:
                if attempt == START_ATTEMPTS or not replica_lost(err) or time.monotonic() >= deadline:
                    raise
                log.warning("model %s: its replica was lost; sending the request again", self.name)
                continue
            if "error" in answer:
                raise ApiError.from_item(answer, self._retry_after_s)
            return answer
        raise AssertionError("unreachable")

    async def _embed_once(self, request, started_at, deadline, load_timeout_s, loaded) -> dict:
        try:
            response = self._handle.embed.remote(request)
        except Exception as exc:  # noqa: BLE001 - any Ray failure becomes an API error
            raise ray_error(self.name, exc, self._retry_after_s) from exc
        task = asyncio.ensure_future(_resolve(response))
        try:
            if load_timeout_s is not None:
                load_deadline = min(deadline, started_at + load_timeout_s)
                await asyncio.wait({task}, timeout=max(0.0, load_deadline - time.monotonic()))
                if not task.done() and not loaded():
                    raise load_timeout_error(self.name, load_timeout_s, self._retry_after_s)
            await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not task.done():
                raise deadline_error(started_at, deadline)
            return task.result()
        except (ApiError, asyncio.CancelledError):
            response.cancel()
            task.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - Ray failures become API errors
            raise ray_error(self.name, exc, self._retry_after_s) from exc
