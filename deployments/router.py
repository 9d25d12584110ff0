"""OrchardRouter: the HTTP ingress, routing each request by its `model` field.

The FastAPI app is built by `create_app(core)` from a RouterCore, which holds one ModelClient per
hosted model; the Ray Serve deployment builds both at replica start (tests can drive create_app
with any clients through httpx). RouterCore sends a request to its model and hands the API
adapters (deployments.openai, deployments.responses, deployments.anthropic) the router's event stream
(deployments.events); it also serves the model routes, health and metrics. No MLX here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import TaskCancelledError
from ray.serve.exceptions import RequestCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import hop_trace, output
from .adapters import AdapterRoute, adapter_card_fields, adapter_routes
from .anthropic.serving import install_anthropic_routes
from .config import RouterConfig
from .events import Event
from .hop import Embeddings, EmbedRequest, GenerateRequest
from .http.auth import check_api_key
from .http.body import read_body
from .http.errors import ApiError, openai_error_response
from .http.images import ImageLoader
from .http.validation import problem_param
from .metrics import CONTENT_TYPE_LATEST, RouterMetrics
from .model_client import ModelCall, ModelClient, RayEmbeddingClient, RayModelClient, wrong_kind_error
from .model_directory import LOADED, ModelDirectory
from .openai.embeddings import install_embedding_routes
from .openai.protocol import model_card
from .openai.serving import install_openai_routes
from .parsers import Parsing
from .replica_status import ReplicaGone, ReplicaStatus
from .request_router import routing_decisions
from .responses.serving import install_responses_routes
from .responses.store import HandleBackend, LogBackend, StoreClient
from .settings import LOADED_CALL_TIMEOUT_S, ModelFacts

log = logging.getLogger("ray.serve")


class RouterCore:
    """State and request handling shared by every route."""

    def __init__(
        self,
        config: RouterConfig,
        models: dict[str, ModelClient],
        directory: ModelDirectory | None = None,
        store: StoreClient | None = None,
        adapters: dict[str, AdapterRoute] | None = None,
    ):
        """`directory`: the models' load states (None: every model is always loaded, no governor);
        `store`: the Responses API's stored responses (None: kept in this process); `adapters`:
        the LoRA adapter names, each served by its base model."""
        self.config = config
        self.models = models
        self.adapters = adapters or {}
        self.directory = directory
        limits = config.response_store
        self.store = store or StoreClient(LogBackend(limits.max_responses, limits.max_bytes))
        self.api_key = config.resolved_api_key()
        self.images = ImageLoader(config.images.limits())
        self.metrics = RouterMetrics()
        self.replica_status = ReplicaStatus()
        self.created = int(time.time())
        self.trace = hop_trace.open_trace("router")  # per-hop timestamps (ORCHARD_HOP_TRACE), else None

    def is_loaded(self, name: str) -> bool:
        if self.directory is None:
            return True
        self.directory.start()
        return self.directory.record(name).state == LOADED

    def starting(self) -> list[str]:
        """Eager models that have not finished their first load (the app is still starting)."""
        if self.directory is None:
            return []
        self.directory.start()
        return [r.name for r in self.directory.models.values() if r.facts.load == "eager" and not r.loads]

    def load_timeout(self, name: str) -> float | None:
        """The first-chunk limit of a request that finds its model unloaded; None when it is loaded.
        A model whose load is failing answers 503 at once, with Ray's reason."""
        if self.is_loaded(name):
            return None
        rec = self.directory.record(name)
        if rec.load_error:
            raise ApiError(
                503,
                f"model {name!r} failed to load: {rec.load_error}",
                type="server_error",
                code="model_load_failed",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        return rec.facts.load_timeout_s

    def touch(self, name: str) -> None:
        if self.directory is not None:
            self.directory.touch(name)

    def model_card(self, name: str) -> dict[str, Any]:
        if self.directory is not None:
            self.directory.start()  # a client that only ever lists the models sees them load too
        extra = self.directory.record(name).card() if self.directory is not None else {"state": LOADED}
        return model_card(name, self.created, kind=self.models[name].kind, **extra)

    async def card(self, name: str) -> dict[str, Any]:
        """A model's or an adapter's /v1/models entry (404 for neither)."""
        base, adapter = self.resolve(name)
        if adapter is None:
            return self.model_card(name)
        return self.adapter_card(adapter, await self.adapter_states(base))

    async def cards(self) -> list[dict[str, Any]]:
        """Every model's entry, then every adapter's (each loaded base asked once for its adapters)."""
        bases = sorted({r.base for r in self.adapters.values()})
        states = dict(zip(bases, await asyncio.gather(*(self.adapter_states(b) for b in bases))))
        adapters = [self.adapter_card(name, states[r.base]) for name, r in self.adapters.items()]
        return [self.model_card(n) for n in self.models] + adapters

    def adapter_card(self, name: str, states: dict[str, dict] | None) -> dict[str, Any]:
        """An adapter's entry from its base's state and the engine's `states` of the base's adapters."""
        route = self.adapters[name]
        base_state = self.model_card(route.base)["state"]
        engine_state = None if states is None else states.get(name)
        return model_card(name, self.created, **adapter_card_fields(route, base_state, engine_state))

    async def adapter_states(self, base: str) -> dict[str, dict] | None:
        """The states of a loaded base's adapters (one replica's); None for a base that is not loaded
        (asking would load it) or that did not answer."""
        if not self.is_loaded(base):
            return None
        try:
            return await self.models[base].adapters("adapter_states", 5.0)
        except ApiError as exc:
            log.debug("model %s: no adapter states (%s)", base, exc.message)
            return None

    def loaded_names(self) -> list[str]:
        return [n for n in self.models if self.is_loaded(n)]

    def client(self, name: str) -> ModelClient:
        if name not in self.models:
            hosted = ", ".join(sorted(self.models))
            adapters = f"; adapters: {', '.join(sorted(self.adapters))}" if self.adapters else ""
            raise ApiError(
                404,
                f"model {name!r} is not hosted here; hosted models: {hosted}{adapters}",
                param="model",
                code="model_not_found",
            )
        return self.models[name]

    def resolve(self, name: str) -> tuple[str, str | None]:
        """The model that serves `name`, and the adapter `name` is (None: the model itself); 404
        for a name that is neither."""
        route = self.adapters.get(name)
        if route is not None:
            return route.base, name
        self.client(name)
        return name, None

    def client_of_kind(self, name: str, kind: str) -> ModelClient:
        """The client of the model that serves `name` (an adapter's: its base's), if that model is
        of this kind (404 unknown, 400 the other kind)."""
        client = self.client(self.resolve(name)[0])
        if client.kind != kind:
            raise wrong_kind_error(name, client.kind)
        return client

    async def read_body(self, request: Request) -> bytes:
        return await read_body(request, self.config.max_request_body_bytes)

    async def check_auth(self, request: Request) -> None:
        """The routes' API-key dependency. Async, so FastAPI runs it on the event loop: a plain
        function would go through a worker thread per request (a thread hop and GIL hand-offs,
        18% of the router's GIL time in a 64-request burst)."""
        check_api_key(request, self.api_key)

    def observe(self, model: str, endpoint: str, status: int) -> None:
        """Count one answered request (a model not hosted here counts as "-")."""
        known = model in self.models or model in self.adapters
        self.metrics.observe_request(model if known else "-", endpoint, status)

    async def start(self, model: str, request: GenerateRequest, start: float) -> ModelCall:
        """Send a request to its model; returns once its first chunk is there (or raises ApiError).
        Every API adapter calls this, then reads the call through `stream` or `collect`. A LoRA
        adapter's name goes to its base model, the request naming the adapter."""
        model, adapter = self.resolve(model)
        client = self.client_of_kind(model, "chat")
        if adapter is not None:
            request = dataclasses.replace(request, adapter=adapter)
        load_timeout = self.load_timeout(model)
        self.touch(model)
        if self.trace is not None:  # the replica's trace records take the router's id
            request = dataclasses.replace(request, trace_key=hop_trace.request_key())
        handle_call = time.time()
        call = await client.start(request, start, start + self.config.request_timeout_s, load_timeout)
        if self.trace is not None:
            first = hop_trace.wall(call.first_token_at)
            key = hop_trace.request_key()
            self.trace.write(
                {"id": key, "router_in": hop_trace.wall(start), "handle_call": handle_call, "router_first": first}
            )
        if load_timeout is not None and call.first_token_at is not None:
            self.metrics.cold_ttft.labels(model).observe(call.first_token_at - start)
        return call

    async def embed(self, model: str, request: EmbedRequest, start: float) -> Embeddings:
        """An embedding model's vectors (POST /v1/embeddings); an unloaded model is loaded first,
        as for `start` (503 after its load_timeout_s)."""
        client = self.client_of_kind(model, "embedding")
        load_timeout = self.load_timeout(model)
        self.touch(model)
        deadline = start + self.config.request_timeout_s
        answer = await client.embed(request, start, deadline, load_timeout, lambda: self.is_loaded(model))
        self.metrics.observe_usage(model, {"prompt_tokens": answer["prompt_tokens"]})
        return answer

    async def collect(self, call: ModelCall, parsing: Parsing | None) -> list[Event]:
        """A call's whole response (`output.collect`); closes the call."""
        try:
            return await output.collect(call, parsing)
        finally:
            await call.close()
            self._record(call)

    async def stream(self, call: ModelCall, parsing: Parsing | None) -> AsyncIterator[list[Event]]:
        """A call's streamed response (`output.stream`); closes the call at the end or when abandoned."""
        try:
            async for batch in output.stream(call, parsing):
                yield batch
        finally:
            await call.close()
            self._record(call)

    def _record(self, call: ModelCall) -> None:
        m, name = self.metrics, call.model
        if call.first_token_at is not None:
            m.ttft.labels(name).observe(call.first_token_at - call.started_at)
        for gap, n in call.gaps:
            m.observe_gap(name, gap, n)
        if call.last_token_at is not None:
            m.duration.labels(name).observe(call.last_token_at - call.started_at)
        m.observe_usage(name, call.usage)

    async def health(self) -> JSONResponse:
        """GET /health: the loaded models' health checks; unloaded ones report their state, eager
        ones still on their first load make it 503 (starting)."""
        names = self.loaded_names()
        results = await asyncio.gather(*(self.model_health(n, timeout_s=5.0) for n in names), return_exceptions=True)
        status = {n: self.model_card(n)["state"] for n in self.models}
        checked = [(n, r) for n, r in zip(names, results) if r is not None or self.is_loaded(n)]  # not unloaded since
        status.update({n: ("ok" if r is None else f"unhealthy: {r}") for n, r in checked})
        starting = self.starting()
        status.update({n: "starting" for n in starting})
        healthy = all(r is None for r in results) and not starting
        return JSONResponse(
            {"status": "ok" if healthy else "unhealthy", "models": status}, status_code=200 if healthy else 503
        )

    async def gather_stats(self) -> dict[str, dict | None]:
        """Stats of the loaded models (calling an unloaded one would load it)."""
        names = self.loaded_names()
        results = await asyncio.gather(*(self.model_stats(n, timeout_s=5.0) for n in names), return_exceptions=True)
        return {n: (None if isinstance(r, BaseException) else r) for n, r in zip(names, results)}

    async def _from_replicas(self, name: str, read, timeout_s: float):
        """`read` (ReplicaStatus.stats or .health) on the model's running replicas as the directory
        last saw them; once more after a fresh poll when those are gone (replaced, or stopped)."""
        for attempt in range(2):
            try:
                return await read(self.directory.record(name).actors, timeout_s)
            except ReplicaGone:
                if attempt:
                    raise
                await self.directory.refresh()
            except TimeoutError:
                raise ApiError(
                    504, f"model {name!r} did not answer within {timeout_s:g} s", type="timeout_error", code="timeout"
                ) from None

    def _names_known(self, name: str) -> bool:
        """Whether status reads can go to the replica actors (the directory has their names; not
        with a Ray whose status carries none): else they go through the handle, and count."""
        return self.directory is not None and bool(self.directory.record(name).actors)

    async def model_stats(self, name: str, timeout_s: float) -> dict[str, Any]:
        """A loaded model's engine stats, read from a replica actor, so that the read is no request
        the governor counts as use (deployments.replica_status)."""
        if not self._names_known(name):
            return await self.models[name].stats(timeout_s=timeout_s)
        try:
            return await self._from_replicas(name, self.replica_status.stats, timeout_s)
        except ReplicaGone:
            raise ApiError(
                503,
                f"model {name!r} stopped while its stats were read (it is unloading); retry",
                type="server_error",
                code="model_unloading",
            ) from None

    async def model_health(self, name: str, timeout_s: float) -> None:
        """A loaded model's health checks, every replica's, the same way as `model_stats`; a model
        whose replicas stopped since the directory's poll (an unload) is not unhealthy."""
        if not self._names_known(name):
            return await self.models[name].health(timeout_s=timeout_s)
        try:
            await self._from_replicas(name, self.replica_status.health, timeout_s)
        except ReplicaGone:
            if self.is_loaded(name):
                raise

    async def load(self, name: str) -> dict[str, Any]:
        """POST /v1/models/{name}/load: returns once the model is loaded (503 after load_timeout_s)."""
        base, adapter = self.resolve(name)
        if adapter is not None:
            return await self.load_adapter(base, adapter)
        client = self.client(name)
        self.touch(name)
        timeout = self.load_timeout(name) or LOADED_CALL_TIMEOUT_S
        info = await client.info(timeout_s=timeout, load=True)
        if self.directory is not None:
            await self.directory.refresh()
        return {**self.model_card(name), "replica": info}

    async def load_adapter(self, base: str, adapter: str) -> dict[str, Any]:
        """POST /v1/models/{adapter}/load: its base first (as the base's own load), then the adapter
        into one of the base's slots (one replica's, with several); a malformed adapter is a 4xx
        naming it and what is wrong."""
        await self.load(base)
        state = await self.models[base].adapters("load_adapter", LOADED_CALL_TIMEOUT_S, adapter)
        return self.adapter_card(adapter, {adapter: state})

    async def unload_adapter(self, base: str, adapter: str) -> dict[str, Any]:
        """POST /v1/models/{adapter}/unload: evicts it from its base's slots, the base stays (an
        adapter with requests running: the engine's refusal); nothing to do while the base is not
        loaded."""
        if not self.is_loaded(base):
            return {**self.adapter_card(adapter, None), "unload_requested": False}
        state = await self.models[base].adapters("unload_adapter", LOADED_CALL_TIMEOUT_S, adapter)
        return {**self.adapter_card(adapter, {adapter: state}), "unload_requested": True}

    async def unload(self, name: str) -> dict[str, Any]:
        """POST /v1/models/{name}/unload: the governor unloads it once idle (pinned: 409)."""
        base, adapter = self.resolve(name)
        if adapter is not None:
            return await self.unload_adapter(base, adapter)
        client = self.client(name)
        if self.directory is None:
            raise ApiError(
                409, "this router runs without the memory governor: models cannot be unloaded", code="not_supported"
            )
        rec = self.directory.record(name)
        if rec.facts.keep_alive_s is None:
            raise ApiError(
                409,
                f"model {name!r} is pinned (keep_alive: forever) and is never unloaded",
                param="keep_alive",
                code="model_pinned",
            )
        if rec.state == LOADED:
            await client.request_unload(timeout_s=10.0)
            self.directory.expect_change()
        return {**self.model_card(name), "unload_requested": rec.state == LOADED}


def memory_summary(directory: ModelDirectory) -> dict[str, Any]:
    return {"budget_bytes": directory.budget_bytes, "used_bytes": directory.used_bytes()}


def _install_error_handlers(app: FastAPI) -> None:
    """Errors of the OpenAI-shaped routes (the Anthropic routes answer their own)."""

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return openai_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = problem_param(err["loc"][1:])
        return openai_error_response(ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return openai_error_response(ApiError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception):
        if isinstance(exc, (TaskCancelledError, RequestCancelledError)):  # its client left: nobody to answer
            log.debug("a request was cancelled: %r", exc)
            return openai_error_response(ApiError(499, "the request was cancelled", type="server_error"))
        log.exception("unexpected error in the router")
        return openai_error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def create_app(core: RouterCore) -> FastAPI:
    # With an API key every route but /health needs it; the schema and docs pages are then off.
    keyed = core.api_key is not None
    app = FastAPI(
        title="mlx-orchard",
        summary="OpenAI-compatible API over MLX models",
        docs_url=None if keyed else "/docs",
        redoc_url=None if keyed else "/redoc",
        openapi_url=None if keyed else "/openapi.json",
    )
    _install_error_handlers(app)
    auth = Depends(core.check_auth)

    install_openai_routes(app, core, auth)
    install_embedding_routes(app, core, auth)
    install_responses_routes(app, core, auth)
    _install_model_routes(app, core, auth)
    install_anthropic_routes(app, core)

    @app.get("/health")
    async def health():
        return await core.health()

    @app.get("/metrics", dependencies=[auth])
    async def metrics():
        for name, stats in (await core.gather_stats()).items():
            core.metrics.set_engine_stats(name, stats)
        decisions = routing_decisions()
        for name, client in core.models.items():
            core.metrics.set_routing(name, decisions.get(getattr(client, "deployment", None)))
        if core.directory is not None:
            core.metrics.set_governor(core.directory)
        return Response(core.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _install_model_routes(app: FastAPI, core: RouterCore, auth) -> None:
    """/v1/models and one model's card, load, unload and cache stats."""

    @app.get("/v1/models", dependencies=[auth])
    async def list_models():
        return {
            "object": "list",
            "data": await core.cards(),
            **({"memory": memory_summary(core.directory)} if core.directory is not None else {}),
        }

    @app.post("/v1/models/{name:path}/load", dependencies=[auth])
    async def load_model(name: str):
        return await core.load(name)

    @app.post("/v1/models/{name:path}/unload", dependencies=[auth])
    async def unload_model(name: str):
        return await core.unload(name)

    @app.get("/v1/models/{name:path}/cache", dependencies=[auth])
    async def model_cache(name: str):
        name, _ = core.resolve(name)  # an adapter's cache is its base's
        if not core.is_loaded(name):
            return {
                "object": "model.cache",
                "model": name,
                "state": core.model_card(name)["state"],
                "cache": {},
                "engine": {},
            }
        stats = await core.model_stats(name, timeout_s=10.0)
        cache = stats.get("cache") if isinstance(stats.get("cache"), dict) else {}
        engine = {k: v for k, v in stats.items() if k != "cache"}
        return {"object": "model.cache", "model": name, "cache": cache, "engine": engine}

    @app.get("/v1/models/{name:path}", dependencies=[auth])
    async def retrieve_model(name: str):
        return await core.card(name)


def model_client(name: str, handle, config: RouterConfig, facts: ModelFacts | None) -> ModelClient:
    """The router's client of one model; a chat model with one replica gathers its requests."""
    if facts is not None and facts.kind == "embedding":
        return RayEmbeddingClient(name, handle, config)
    gather = config.gather_requests and facts is not None and facts.replicas == 1
    return RayModelClient(name, handle, config, gather=gather)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512)
@serve.ingress()
class OrchardRouter:
    """The ingress deployment. `models` maps each model name to its ModelServer's handle, `store`
    is the ResponseStore's handle (deployments.responses.store)."""

    def __init__(
        self,
        router: dict,
        models: dict[str, Any],
        facts: dict[str, dict] | None = None,
        budget_bytes: int = 0,
        store: Any = None,
    ):
        config = RouterConfig.model_validate(router)
        known = {name: ModelFacts.model_validate(f) for name, f in (facts or {}).items()}
        clients = {name: model_client(name, h, config, known.get(name)) for name, h in models.items()}
        directory = None
        if facts is not None:
            directory = ModelDirectory(
                facts,
                budget_bytes,
                lambda n: clients[n].info(timeout_s=10.0),
                app_name=serve.get_replica_context().app_name,
            )
        store_client = StoreClient(HandleBackend(store)) if store else None
        adapters = adapter_routes(known)
        self.core = RouterCore(config, clients, directory, store_client, adapters)
        names = ", ".join([*self.core.models, *(f"{a} (adapter of {r.base})" for a, r in adapters.items())])
        log.info("router ready for models: %s", names)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.core)
