"""The Ray Serve application builder: `import_path: deployments.app:build_app`.

The YAML `args:` map 1:1 to OrchardConfig (deployments/config.py). One ModelServer deployment is
bound per model, named `model-<name>`, and the OrchardRouter ingress gets their handles.

Every model deployment autoscales between 0 replicas (unloaded) and its num_replicas (loaded);
the memory governor (deployments.governor, the application's `autoscaling_policy`) decides which
under the host budget `args.memory`. The builder works out what the governor needs to know
before a model was ever loaded: its KV share of the budget and its estimated footprint, and it
refuses a config that can never fit (a model larger than the budget, eager models over it).

On a cluster the builder runs on one machine and the replicas on others, so nothing it passes a
replica may be a fact of its own machine: the source string travels as written (the replica
resolves it, and exports a GGUF into its own node's cache), and the CPU fast path's OpenBLAS is
preloaded by its soname (`LD_PRELOAD=libopenblas.so.0` through the runtime_env), which each
node's dynamic loader finds in its own library path (the cmeel-openblas wheel's directory, first on
LD_LIBRARY_PATH when the builder's environment has it, else the system's;
macOS ignores LD_PRELOAD, and MLX there runs on Metal). Placement is Ray's: custom `resources`
per replica (e.g. the Apple GPU of a Mac) and `max_replicas_per_node`.

Note that a `ray_actor_options` override in the YAML `deployments:` section replaces the whole
dict, runtime_env and resources included: set a model's num_cpus under its args
(`deployment.num_cpus`) instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ray.serve import Application

from engine.loading.cpu_fast_path import openblas_env

from .adapters import adapter_bytes, engine_fields
from .config import ConfigError, ModelConfig, OrchardConfig, RouterConfig, validate_args
from .embedding_server import EmbeddingServer
from .governor import FALLBACK_POLICY_PATH, governor_kwargs
from .model_server import ModelServer
from .request_router import ROUTER_PATH
from .responses.store import ResponseStore
from .router import OrchardRouter
from .settings import ModelFacts

log = logging.getLogger("ray.serve")
MAX_LOAD_RETRIES = 2  # a model whose replica fails to start is retried this often, then reported failed
# How fast the governor sees what happens: replicas and handles push their metrics this often,
# averaged over this window (Ray's defaults, 10 s and 30 s, would make every load wait).
METRICS_INTERVAL_S = 0.5
LOOK_BACK_PERIOD_S = 2.0


@dataclass(frozen=True)
class ModelPlan:
    """What the builder decided for one model."""

    config: ModelConfig
    engine: dict  # EngineConfig fields, with the KV budget resolved (an embedding model: its EmbeddingOptions)
    footprint_bytes: int  # per replica, estimated (a loaded replica measures its own)


def model_actor_options(model: ModelConfig, reserve_bytes: int | None = None) -> dict:
    """Ray options of a model's replicas. OpenBLAS is preloaded by name unless the model turns the
    fast path off: a replica on a node without it, or whose MLX has a GPU, keeps its own BLAS
    (the loader decides float32 weights in the replica, from what that process has).
    `reserve_bytes` (memory.per_node): Ray's `memory` resource each replica holds."""
    options: dict = {"num_cpus": model.deployment.num_cpus}
    if reserve_bytes:
        options["memory"] = reserve_bytes
    if model.deployment.resources:
        options["resources"] = dict(model.deployment.resources)
    preload = openblas_env(require_local=False) if model.engine.fast_cpu is not False else {}
    env = {**preload, **model.deployment.env_vars}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def request_router_config(model: ModelConfig) -> dict | None:
    """Ray Serve's request_router_config for the model (None: Ray's power-of-two default)."""
    if model.deployment.request_router != "prefix_affinity":
        return None
    affinity = model.deployment.affinity
    kwargs = {**affinity.model_dump(exclude={"report_period_s"}), "deployment": model.deployment_name}
    return {
        "request_router_class": ROUTER_PATH,
        "request_router_kwargs": kwargs,
        "request_routing_stats_period_s": affinity.report_period_s,
    }


def plan_model(model: ModelConfig, budget: int) -> ModelPlan:
    """Resolve the model's KV budget against the host budget and estimate its footprint."""
    from engine.memory import estimate_working_bytes

    if model.kind == "embedding":
        return plan_embedding_model(model)
    engine = {**model.engine.model_dump(), **engine_fields(model.adapters, model.max_loaded_adapters)}
    if engine["cache_memory_mb"] is None:
        engine["cache_memory_mb"] = max(1, int(budget * model.engine.cache_memory_percent) >> 20)
    weights = model.weights_mb * 2**20 if model.weights_mb else _estimate_weights(model)
    if weights is None:
        raise ConfigError(
            f"model {model.name!r}: {model.source!r} is not downloaded yet, so the size of its "
            "weights is unknown: give it as weights_mb (the governor measures it after the first load)"
        )
    adapters = adapter_bytes(model.adapters, model.max_loaded_adapters)  # resident in the same process
    kv = engine["cache_memory_mb"] * 2**20
    return ModelPlan(model, engine, weights + adapters + kv + estimate_working_bytes(weights))


def plan_embedding_model(model: ModelConfig) -> ModelPlan:
    """An embedding model's footprint from its files (weights + a full pass at the full context);
    a source that cannot be read is a config error naming the model."""
    from engine.embed.engine import estimate_footprint
    from engine.errors import OrchardError

    options = model.embedding.model_dump()
    try:
        footprint = estimate_footprint(model.source, max_batch_size=options["rows_per_pass"])
    except (OrchardError, OSError, ValueError) as exc:
        raise ConfigError(f"model {model.name!r}: cannot read the embedding model {model.source!r}: {exc}") from None
    return ModelPlan(model, options, footprint.total)


def _estimate_weights(model: ModelConfig) -> int | None:
    """From the weight files' headers; an unreadable file does not stop the other models: it is
    estimated from its size, and its own load fails with the reason (served as a 503)."""
    from engine.loading.sources import resolve_source
    from engine.memory import estimate_weights_bytes

    try:
        weights = estimate_weights_bytes(model.source, _fast_cpu(model))
        draft = model.engine.speculative.draft_model  # a draft model lives in the same process
        return weights + (estimate_weights_bytes(draft, _fast_cpu(model)) or 0) if draft and weights else weights
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        log.warning(
            "model %s: cannot read the size of %s (%s): estimating from the file size", model.name, model.source, exc
        )
        path = Path(resolve_source(model.source).location)
        return path.stat().st_size * (8 if _fast_cpu(model) else 1)


def _fast_cpu(model: ModelConfig) -> bool:
    if model.engine.fast_cpu is not None:
        return model.engine.fast_cpu
    from engine.loading.cpu_fast_path import wants_fast_path

    return wants_fast_path()


def check_budget(plans: list[ModelPlan], budget: int) -> None:
    """A model that can never fit, or eager models that cannot all load at start: a config error."""
    from engine.memory import mib

    for p in plans:
        need = p.footprint_bytes * p.config.deployment.num_replicas
        if need > budget:
            chat = p.config.kind == "chat"
            kv = f"KV {p.engine['cache_memory_mb']} MiB" if chat else "no KV"
            knob = "engine.cache_memory_mb" if chat else "embedding.rows_per_pass"
            raise ConfigError(
                f"model {p.config.name!r} needs {mib(need)} (weights + {kv} + "
                f"working memory, x{p.config.deployment.num_replicas} replicas) but the whole memory budget is "
                f"{mib(budget)}: raise args.memory.budget_mb / budget_percent, or lower its {knob}"
            )
    eager = [p for p in plans if p.config.load == "eager"]
    total = sum(p.footprint_bytes * p.config.deployment.num_replicas for p in eager)
    if total > budget:
        names = ", ".join(f"{p.config.name} {mib(p.footprint_bytes)}" for p in eager)
        raise ConfigError(
            f"the eager models need {mib(total)} together ({names}) but the memory budget is "
            f"{mib(budget)}: set load: on_demand on some of them, or raise args.memory"
        )


def autoscaling_config(p: ModelPlan, budget: int, per_node: bool = False) -> dict:
    m = p.config
    full = m.deployment.num_replicas
    return {
        "min_replicas": full if (m.pinned and m.load == "eager") else 0,
        "max_replicas": full,
        "initial_replicas": full if m.load == "eager" else 0,
        "metrics_interval_s": METRICS_INTERVAL_S,
        "look_back_period_s": LOOK_BACK_PERIOD_S,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,  # keep_alive is the governor's
        "downscale_to_zero_delay_s": 0.0,
        "policy": {
            "policy_function": FALLBACK_POLICY_PATH,
            "policy_kwargs": governor_kwargs(
                model=m.name,
                budget_bytes=budget,
                footprint_bytes=p.footprint_bytes,
                full=full,
                keep_alive_s=m.keep_alive,
                load_timeout_s=m.load_timeout_s,
                per_node=per_node,
                resources=m.deployment.resources,
                max_replicas_per_node=m.deployment.max_replicas_per_node,
            ),
        },
    }


def bind_model(p: ModelPlan, budget: int, per_node: bool = False):
    if p.config.kind == "embedding":
        return bind_embedding_model(p, budget, per_node)
    model, engine = p.config, p.engine
    max_ongoing = model.deployment.max_ongoing_requests or engine["max_num_seqs"] + engine["max_waiting"]
    placement = {
        k: v
        for k, v in (
            ("max_replicas_per_node", model.deployment.max_replicas_per_node),
            ("request_router_config", request_router_config(model)),
        )
        if v is not None
    }
    return ModelServer.options(
        name=model.deployment_name,
        **placement,
        autoscaling_config=autoscaling_config(p, budget, per_node),
        max_ongoing_requests=max_ongoing,
        max_queued_requests=model.deployment.max_queued_requests,
        graceful_shutdown_wait_loop_s=0.5,  # an idle replica being unloaded stops at once
        max_constructor_retry_count=MAX_LOAD_RETRIES,
        ray_actor_options=model_actor_options(model, p.footprint_bytes if per_node else None),
    ).bind(
        name=model.name,
        source=model.source,
        engine=engine,
        default_sampling=model.default_sampling,
        stream_window_ms=model.stream_window_ms,
        stream_max_chunks_per_s=model.stream_max_chunks_per_s,
        memory_share_bytes=p.footprint_bytes,
        allow_ignore_eos=model.allow_ignore_eos,
        prefix_block_chars=model.deployment.affinity.block_chars
        if model.deployment.request_router == "prefix_affinity"
        else None,
    )


def bind_embedding_model(p: ModelPlan, budget: int, per_node: bool = False):
    """An embedding model's EmbeddingServer, under the same governor as the chat models. It takes
    enough requests at once for @serve.batch to fill two batches (one running, one gathering)."""
    model = p.config
    batch = model.embedding.max_batch_size
    per_node_cap = model.deployment.max_replicas_per_node
    return EmbeddingServer.options(
        name=model.deployment_name,
        **({"max_replicas_per_node": per_node_cap} if per_node_cap else {}),
        autoscaling_config=autoscaling_config(p, budget, per_node),
        max_ongoing_requests=model.deployment.max_ongoing_requests or max(64, 2 * batch),
        max_queued_requests=model.deployment.max_queued_requests,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=MAX_LOAD_RETRIES,
        ray_actor_options=model_actor_options(model, p.footprint_bytes if per_node else None),
    ).bind(name=model.name, source=model.source, embedding=p.engine, memory_share_bytes=p.footprint_bytes)


def model_facts(p: ModelPlan) -> ModelFacts:
    """What the router reports of a model before it ever loaded (/v1/models, metrics)."""
    m = p.config
    return ModelFacts(
        deployment=m.deployment_name,
        kind=m.kind,
        load=m.load,
        keep_alive_s=m.keep_alive,
        load_timeout_s=m.load_timeout_s,
        footprint_bytes=p.footprint_bytes,
        replicas=m.deployment.num_replicas,
        adapters={a.name: a.path for a in m.adapters},
    )


def bind_store(router: RouterConfig):
    """The Responses API's store: one replica that reserves nothing, so it lands on any node. It
    takes none of the routers' custom resources: a node may hold exactly what its routers take."""
    limits = router.response_store
    return ResponseStore.options(ray_actor_options={"num_cpus": 0}).bind(limits.max_responses, limits.max_bytes)


def bind_router(router: RouterConfig, models: dict, facts: dict, budget: int) -> Application:
    return OrchardRouter.options(
        name="OrchardRouter",
        num_replicas=router.num_replicas,
        max_ongoing_requests=router.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": router.num_cpus,
            **({"resources": router.resources} if router.resources else {}),
        },
    ).bind(router=router.model_dump(), models=models, facts=facts, budget_bytes=budget, store=bind_store(router))


def build_app(args: dict) -> Application:
    """Ray Serve app builder. Raises ConfigError naming each bad field of `args`."""
    config: OrchardConfig = validate_args(args)
    budget = config.memory.budget_bytes()
    plans = [plan_model(m, budget) for m in config.models]
    check_budget(plans, budget)
    models = {p.config.name: bind_model(p, budget, config.memory.per_node) for p in plans}
    facts = {p.config.name: model_facts(p).model_dump() for p in plans}
    return bind_router(config.router, models, facts, budget)
