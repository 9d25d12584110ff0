"""The Ray Serve application builder: `import_path: deployments.app:build_app`.

The YAML `args:` map 1:1 to OrchardConfig (deployments/config.py). One ModelServer deployment is
bound per model, named `model-<name>`, and the OrchardRouter ingress gets their handles.

On CPU-only Linux each model replica gets LD_PRELOAD=<OpenBLAS> through its runtime_env, so MLX
in that process uses OpenBLAS (engine.cpu_fast_path). Note that a `ray_actor_options` override in
the YAML `deployments:` section replaces the whole dict, runtime_env included: set a model's
num_cpus under its args (`deployment.num_cpus`) instead.
"""

from __future__ import annotations

from ray.serve import Application

from engine.cpu_fast_path import openblas_env

from .config import ModelConfig, OrchardConfig, RouterConfig, validate_args
from .model_server import ModelServer
from .router import OrchardRouter


def model_actor_options(model: ModelConfig) -> dict:
    options: dict = {"num_cpus": model.deployment.num_cpus}
    env = {**openblas_env(), **model.deployment.env_vars}
    if env:
        options["runtime_env"] = {"env_vars": env}
    return options


def bind_model(model: ModelConfig):
    engine = model.engine
    max_ongoing = model.deployment.max_ongoing_requests or engine.max_num_seqs + engine.max_waiting
    return ModelServer.options(
        name=model.deployment_name,
        num_replicas=model.deployment.num_replicas,
        max_ongoing_requests=max_ongoing,
        max_queued_requests=model.deployment.max_queued_requests,
        ray_actor_options=model_actor_options(model),
    ).bind(
        name=model.name,
        source=model.source,
        engine=engine.model_dump(),
        default_sampling=model.default_sampling,
        stream_window_ms=model.stream_window_ms,
        stream_max_chunks_per_s=model.stream_max_chunks_per_s,
    )


def bind_router(router: RouterConfig, models: dict) -> Application:
    return OrchardRouter.options(
        name="OrchardRouter",
        num_replicas=router.num_replicas,
        max_ongoing_requests=router.max_ongoing_requests,
        ray_actor_options={"num_cpus": router.num_cpus},
    ).bind(router=router.model_dump(), models=models)


def build_app(args: dict) -> Application:
    """Ray Serve app builder. Raises ConfigError naming each bad field of `args`."""
    config: OrchardConfig = validate_args(args)
    models = {m.name: bind_model(m) for m in config.models}
    return bind_router(config.router, models)
