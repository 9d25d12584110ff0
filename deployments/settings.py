"""Typed settings that cross from the app builder to the router and the governor, built once.

The builder turns each `ModelConfig` into the facts the router needs before the model ever loaded
(`ModelFacts`) and the governor's policy arguments (`PolicyKwargs`). Ray carries both as plain dicts
(the router's constructor arguments, `autoscaling_config.policy.policy_kwargs`); each side
validates its dict into the typed model once and reads attributes, never `.get(key, default)`.
The defaults every module shares live here and nowhere else, as do the prefix-affinity options
(`AffinityOptions`), which the YAML sets and the request router reads.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

KEEP_ALIVE_S = 1800.0  # idle seconds before a model unloads (ModelConfig.keep_alive)
LOAD_TIMEOUT_S = 120.0  # how long a request waits for its model to load (ModelConfig.load_timeout_s)
LOADED_CALL_TIMEOUT_S = 30.0  # a call that needs no load (a loaded model's info, a token count)
# What clients may send as `model`: a model's name or a LoRA adapter's (ModelConfig, AdapterConfig).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
NAME_RULE = "must be 1-128 characters: letters, digits and . _ : / -, starting with a letter or digit"


def served_name(v: str) -> str:
    """A model's or an adapter's name as clients send it, stripped; ValueError (NAME_RULE) otherwise."""
    v = v.strip()
    if not NAME_RE.match(v):
        raise ValueError(NAME_RULE)
    return v


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelFacts(_Frozen):
    """What the router knows of one model from the builder: its deployment, how it loads, its
    estimated footprint (a loaded replica reports the measured one)."""

    deployment: str
    kind: Literal["chat", "embedding"] = "chat"
    load: Literal["eager", "on_demand"]
    keep_alive_s: float | None = Field(description="None: pinned, never unloaded")
    load_timeout_s: float
    footprint_bytes: int
    replicas: int = 1
    adapters: dict[str, str] = Field(default_factory=dict, description="its LoRA adapters: name -> directory")


class PolicyKwargs(_Frozen):
    """A model deployment's `policy_kwargs`: what the memory governor knows of it from the builder."""

    model: str
    budget_bytes: int
    footprint_bytes: int  # estimated per replica; also each replica's `memory` reservation with per_node
    full: int = 1  # replicas when loaded
    keep_alive_s: float | None  # None: pinned
    load_timeout_s: float = LOAD_TIMEOUT_S
    per_node: bool = False
    resources: dict[str, float] = Field(default_factory=dict)
    max_replicas_per_node: int | None = None


class AffinityOptions(BaseModel):
    """Prefix-affinity routing (deployments.request_router.PrefixAffinityRouter): the YAML's
    `deployment.affinity`, and what the router validates its `request_router_kwargs` into."""

    model_config = ConfigDict(extra="forbid")

    imbalanced_threshold: int = Field(
        10,
        ge=0,
        description="Balance wins over affinity: a replica with this many more requests than the "
        "least loaded one is not preferred for its prefixes.",
    )
    match_rate_threshold: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Below this share of the prompt matched, a request counts as a new prefix "
        "and goes to the replica that holds the fewest prefixes.",
    )
    block_chars: int = Field(
        64,
        ge=8,
        le=65536,
        description="Characters per hashed prompt block (about 16 tokens at the default).",
    )
    max_blocks_per_replica: int = Field(
        65536,
        ge=16,
        description="Blocks remembered per replica (least recently sent forgotten first).",
    )
    report_period_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="How often each replica reports which prompt prefixes its paged cache "
        "really holds (Ray Serve's request_routing_stats_period_s); the routers take each report as the truth.",
    )
