"""LoRA adapters on the deployment side (issue 37): a chat model's `adapters:` in the YAML, what the
builder checks and adds to the model's estimate, and the router's table of adapter names.

An adapter is a name clients send as `model`, served by its base model's replicas: the router
resolves the name to the base's deployment and sends the request with `GenerateRequest.adapter`
set; the base's engine loads the adapter on demand (at most `max_loaded_adapters` resident) and
applies it to that request's rows of the batch (engine.lora). The engine owns the adapters'
states; the router asks a loaded base for them (`ModelServer.adapter_states`) and never calls an
unloaded one. No MLX here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .settings import ModelFacts, served_name

FILES = ("adapter_config.json", "adapters.safetensors")  # what mlx_lm.lora writes
MAX_LOADED_ADAPTERS = 4  # resident adapters per replica unless the YAML says (the engine's default)
STATE_FIELDS = ("rank", "bytes", "requests", "last_used")  # of the engine's adapter_states, shown as they are


class AdapterConfig(BaseModel):
    """One LoRA adapter of a chat model (`models[i].adapters[j]`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        description="The name clients send as `model` for this adapter; unique among the app's models and adapters."
    )
    path: str = Field(
        description="The adapter's directory as mlx_lm.lora writes it (adapter_config.json and "
        "adapters.safetensors), checked on the machine that builds the app; replicas get its absolute path."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return served_name(v)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        path = Path(v.strip()).expanduser()
        if problem := adapter_problem(path):
            raise ValueError(problem)
        return str(path.resolve())


def adapter_problem(path: Path) -> str | None:
    """Why a directory is not an mlx_lm adapter, judged by its files (None: it has both). Whether
    they fit the base is the engine's to say, when it loads the adapter."""
    if not path.is_dir():
        return f"{str(path)!r}: no such directory (an adapter is a directory with {' and '.join(FILES)})"
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        return f"{str(path)!r}: not an mlx_lm adapter directory (no {', '.join(missing)})"
    return None


def check_adapter_names(models: Iterable[Any]) -> None:
    """Every name a client may send as `model` names one thing: an adapter's name is neither a
    model's nor another adapter's (ValueError naming the clash)."""
    owners = {m.name: f"model {m.name!r}" for m in models}
    for m in models:
        for a in m.adapters:
            if a.name in owners:
                raise ValueError(
                    f"adapter {a.name!r} of model {m.name!r}: {owners[a.name]} has that name already; "
                    "names must be unique among the models and adapters"
                )
            owners[a.name] = f"adapter {a.name!r} of model {m.name!r}"


def adapter_bytes(adapters: list[AdapterConfig], max_loaded: int) -> int:
    """What the builder adds to the base's footprint estimate: `max_loaded` slots, each the size
    of the largest adapter's weights (the engine's stacks; a loaded replica measures them)."""
    if not adapters:
        return 0
    return max_loaded * max(Path(a.path, FILES[1]).stat().st_size for a in adapters)


def engine_fields(adapters: list[AdapterConfig], max_loaded: int) -> dict[str, Any]:
    """The EngineConfig fields of a model's adapters."""
    return {"adapters": [a.model_dump() for a in adapters], "max_loaded_adapters": max_loaded}


# --- the router's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterRoute:
    """Where the router sends a request for an adapter name: its base model's deployment."""

    name: str
    base: str
    path: str


def adapter_routes(facts: dict[str, ModelFacts]) -> dict[str, AdapterRoute]:
    """Every adapter of the app by name, from the builder's facts of each model."""
    return {name: AdapterRoute(name, base, path) for base, f in facts.items() for name, path in f.adapters.items()}


def adapter_card_fields(route: AdapterRoute, base_state: str, engine_state: dict | None) -> dict[str, Any]:
    """An adapter's /v1/models fields beyond id and created, as vLLM lists its LoRAs (`parent`: the
    base, `root`: the adapter's path), with its state: the base's while the base is not loaded,
    else its engine's (`failed` with the reason as `load_error`); `unknown` when the loaded base
    did not say."""
    fields: dict[str, Any] = {"kind": "chat", "parent": route.base, "root": route.path}
    if base_state != "loaded":
        return {**fields, "state": base_state}
    if engine_state is None:
        return {**fields, "state": "unknown"}
    fields["state"] = engine_state.get("state", "unknown")
    fields.update({k: engine_state[k] for k in STATE_FIELDS if k in engine_state})
    if engine_state.get("error"):
        fields["load_error"] = engine_state["error"]
    return fields
