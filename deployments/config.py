"""The application's `args:` schema: what `serve_config.yaml` may say under `args`.

    applications:
      - import_path: deployments.app:build_app
        args:                      # <- validated by OrchardConfig, field for field
          models: [...]
          router: {...}

Every field is described and unknown fields are refused, so a typo fails at `serve run` with a
message that names the field (see `validate_args`). Check a file without starting Ray:

    python -m deployments.config serve_config.yaml
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.config import EngineConfig
from engine.loading import synthetic

from .adapters import MAX_LOADED_ADAPTERS, AdapterConfig, check_adapter_names
from .http.validation import problem_message
from .settings import KEEP_ALIVE_S, LOAD_TIMEOUT_S, AffinityOptions, served_name

IMPORT_PATH = "deployments.app:build_app"


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
PINNED = ("forever", "never", "pinned")


def parse_keep_alive(value: Any) -> float | None:
    """Seconds a model may stay idle before it unloads; None: never (pinned).
    Accepts a number of seconds, "30s" / "5m" / "1h", or "forever" / -1."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 300, '5m' or 'forever'")
    if isinstance(value, (int, float)):
        if value < 0:
            return None
        return float(value)
    text = str(value).strip().lower()
    if text in PINNED or text == "-1":
        return None
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a duration: use seconds (300), '30s', '5m', '1h' or 'forever'")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


class ModelDeploymentOptions(BaseModel):
    """Ray Serve options of one model's deployment (YAML `deployments:` overrides still win)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1, le=64, description="Replicas of this model (each loads its own copy).")
    num_cpus: float = Field(
        0.0, ge=0, description="CPUs Ray reserves per replica. 0 lets several models share a small machine."
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests one replica takes at once. Default: engine max_num_seqs + max_waiting, so the "
        "engine's own queue (and its 503) decides.",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests queued in front of busy replicas before a 503 (-1: no limit)."
    )
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables of the replica process, e.g. OPENBLAS_NUM_THREADS "
        "(LD_PRELOAD for the CPU fast path is added by the builder; its library is found on the replica's node).",
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each replica needs, e.g. {apple_gpu: 1}: replicas only land on nodes "
        "started with them (`ray start --resources '{\"apple_gpu\": 1}'`).",
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="At most this many replicas of this model on one node (1 spreads them)."
    )
    request_router: Literal["power_of_two", "prefix_affinity"] = Field(
        "power_of_two",
        description="How the router picks a replica: power_of_two (Ray Serve's default: the less loaded of two) "
        "or prefix_affinity (the replica that was sent the same prompt prefix, unless queues diverge).",
    )
    affinity: AffinityOptions = Field(
        default_factory=AffinityOptions, description="Options of request_router: prefix_affinity."
    )

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_resources(v)


def check_resources(resources: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources only, each with an amount > 0 (CPUs have their own field)."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU", "memory") or amount <= 0:
            raise ValueError(f"{name!r}: give custom resources with an amount > 0 (CPUs are num_cpus)")
    return resources


class MemoryConfig(BaseModel):
    """The host memory budget every model on a host shares: weights + KV pool + working memory."""

    model_config = ConfigDict(extra="forbid")

    budget_mb: int | None = Field(
        None, ge=64, description="The budget in MiB. Default: budget_percent of the host's memory."
    )
    budget_percent: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The budget as a fraction of the host's memory (on a Mac: Metal's recommended working set, "
        "else RAM). Default: the whole working set on a Mac, 0.6 of RAM elsewhere.",
    )
    per_node: bool = Field(
        False,
        description="Each model replica reserves its footprint as Ray's `memory` resource, so Ray places "
        "replicas only on nodes with that much left and never over-packs one, after a node loss too (a node's "
        "budget: `ray start --memory BYTES`). The governor then budgets against the live nodes' memory (the "
        "smaller of it and budget_mb): a lost node's memory leaves the budget, and idle models unload to make room.",
    )

    @model_validator(mode="after")
    def _one(self) -> MemoryConfig:
        if self.budget_mb is not None and self.budget_percent is not None:
            raise ValueError("give budget_mb or budget_percent, not both")
        return self

    def budget_bytes(self) -> int:
        from engine.memory import default_budget_bytes, host_memory_bytes

        if self.budget_mb is not None:
            return self.budget_mb * 2**20
        if self.budget_percent is not None:
            return int(host_memory_bytes() * self.budget_percent)
        return default_budget_bytes()


class EmbeddingOptions(BaseModel):
    """How an embedding model's replica batches its requests (`kind: embedding`)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        16,
        ge=1,
        le=256,
        description="Requests Ray Serve's @serve.batch merges into one engine call (their inputs encoded "
        "together); 1 turns batching off: each request is its own call, one at a time.",
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long a batch waits for more requests after its first one. 0: it takes the requests "
        "already queued (those that came while the previous batch ran).",
    )
    rows_per_pass: int = Field(
        32,
        ge=1,
        le=1024,
        description="Inputs encoded in one forward pass (sorted by length, padded to the longest of the pass); "
        "the footprint reserves the working memory of this many rows at the full context.",
    )


# Fields of a chat model that mean nothing to an embedding model: given for one, a config error.
CHAT_ONLY = (
    "weights_mb",
    "engine",
    "default_sampling",
    "stream_window_ms",
    "stream_max_chunks_per_s",
    "allow_ignore_eos",
    "adapters",
    "max_loaded_adapters",
)
ADAPTER_FIELDS = ("adapters", "max_loaded_adapters")  # under the model, not under its engine


class ModelConfig(BaseModel):
    """One hosted model."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The name clients send as `model` (also the deployment's name: model-<name>).")
    kind: Literal["chat", "embedding"] = Field(
        "chat",
        description="chat: a generative model (chat/completions, completions, responses, messages); embedding: "
        "a sentence-transformers-style encoder served at /v1/embeddings (declared before `source`, which it "
        "decides how to check).",
    )
    weights_mb: int | None = Field(
        None,
        ge=1,
        description="The weights' size once loaded, in MiB, for the governor's estimate before the first load "
        "measures it. Default: read from the weight files; needed for hub models not downloaded yet and for "
        "sources that exist only on the nodes that run the model (declared before `source`, which reads it).",
    )
    source: str = Field(
        description="Where the weights come from: pkg://<package>/<file>.gguf, a local .gguf file or MLX "
        "directory, or a Hugging Face repo id such as mlx-community/Qwen3-0.6B-8bit. An embedding model: a "
        "bundled name (all-minilm-l6-v2), pkg://<package>/<file>.zip, a local model directory or a hub id."
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="Engine options: batching, streaming, KV cache, limits."
    )
    default_sampling: dict[str, Any] = Field(
        default_factory=dict,
        description="Sampling parameters used when a request leaves them out (temperature, top_p, max_tokens, "
        "stop, ...); same names and ranges as the request fields.",
    )
    stream_window_ms: float = Field(
        30.0,
        ge=0,
        le=1000,
        description="The model deployment sends its output to the router at most once per window (the first "
        "token goes at once). Each hop costs a few ms, so tokens travel in chunks.",
    )
    stream_max_chunks_per_s: float = Field(
        100.0,
        ge=1,
        description="Most chunks per second one model replica sends over all its streams: with many "
        "streams each one's window widens to active_streams / this (every chunk costs CPU in the model "
        "replica, the router and the HTTP proxy).",
    )
    deployment: ModelDeploymentOptions = Field(
        default_factory=ModelDeploymentOptions, description="Ray Serve options of this model's deployment."
    )
    allow_ignore_eos: bool = Field(
        False,
        description="Let clients send ignore_eos (generate past the end of text to max_tokens: benchmarks "
        "want it; on a shared server it lets one client force full-length generations).",
    )
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters of this model, each served by its own name on this model's replicas, in one "
        "batch with the base; loaded on demand.",
    )
    max_loaded_adapters: int = Field(
        MAX_LOADED_ADAPTERS,
        ge=1,
        le=256,
        description="Adapters resident in a replica at once (the least recently used idle one makes room); "
        "the footprint counts this many slots of the largest adapter.",
    )
    embedding: EmbeddingOptions | None = Field(
        None, description="Batching options of an embedding model (kind: embedding); defaults when left out."
    )
    load: Literal["eager", "on_demand"] = Field(
        "eager", description="eager: loaded when the app starts; on_demand: loaded by the first request for it."
    )
    keep_alive: float | None = Field(
        KEEP_ALIVE_S,
        description="Idle time after which the model unloads (seconds, '30s', '5m', '1h'), or 'forever' to pin "
        "it: a pinned model is never unloaded, not even to make room for another.",
    )
    load_timeout_s: float = Field(
        LOAD_TIMEOUT_S,
        gt=0,
        description="How long a request waits for this model to load (and for room in the memory budget) "
        "before it gets 503 with Retry-After.",
    )

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, v: Any) -> float | None:
        return None if v is None else parse_keep_alive(v)

    @property
    def pinned(self) -> bool:
        return self.keep_alive is None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return served_name(v)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str, info: ValidationInfo) -> str:
        """The builder checks the source on its own machine; a model replica resolves it again on its
        node. A source missing here is fine when weights_mb says its size (the builder needs no file)."""
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if info.data.get("kind") == "embedding":
            if problem := embedding_source_problem(v):
                raise ValueError(f"{problem} on this machine (where the app is built)")
            return v
        problem = source_problem(v)
        if problem and not info.data.get("weights_mb"):
            raise ValueError(
                f"{problem} on this machine (where the app is built); if it exists only on the "
                "nodes that run the model, give weights_mb"
            )
        return v

    @field_validator("default_sampling")
    @classmethod
    def _sampling(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            return {}
        from engine.sampling import SamplingParams  # imports MLX: only when there is something to check

        try:
            parsed = SamplingParams.model_validate(v)
        except ValidationError as exc:
            raise ValueError(format_validation_error(exc, root="default_sampling")) from None
        return parsed.model_dump(include=set(v))

    @model_validator(mode="after")
    def _kind_fields(self) -> ModelConfig:
        """An embedding model refuses the chat-only fields by name (and a chat model `embedding`)."""
        if self.kind == "chat":
            if self.embedding is not None:
                raise ValueError("embedding: only for an embedding model (kind: embedding)")
            if given := [f for f in ADAPTER_FIELDS if f in self.engine.model_fields_set]:
                raise ValueError(f"engine.{given[0]}: give {given[0]} under the model, beside engine")
            return self
        given = [f for f in CHAT_ONLY if f in self.model_fields_set]
        given += [f"deployment.{f}" for f in ("request_router", "affinity") if f in self.deployment.model_fields_set]
        if given:
            raise ValueError(f"{given[0]}: not an option of an embedding model (kind: embedding); remove it")
        if self.embedding is None:
            self.embedding = EmbeddingOptions()
        return self

    @property
    def deployment_name(self) -> str:
        return "model-" + self.name.replace("/", "--").replace(":", "-")


class ResponseStoreConfig(BaseModel):
    """The stored responses of the Responses API (`store: true`), kept in memory by one Ray Serve
    replica that every router replica calls; least recently used evicted first."""

    model_config = ConfigDict(extra="forbid")

    max_responses: int = Field(4096, ge=1, description="Stored responses kept at most.")
    max_bytes: int = Field(
        64 * 2**20, ge=1024, description="Bytes of stored responses (each with its conversation, as JSON) at most."
    )


class ImagesConfig(BaseModel):
    """Images in requests (vision models): the limits every image is checked against in the router,
    before anything is queued, and the hosts image URLs may be fetched from."""

    model_config = ConfigDict(extra="forbid")

    max_per_request: int = Field(8, ge=1, le=256, description="Images in one request at most.")
    max_bytes: int = Field(20 * 2**20, ge=1024, description="Bytes of one image file at most.")
    max_pixels: int = Field(
        4096 * 4096, ge=64, description="Pixels (width x height) of one image at most, read from its header."
    )
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the router may fetch: exact names or patterns such as "
        "'*.example.com'. Empty (the default): only data: URLs and base64 images are taken, because a server "
        "that fetches any URL a client names is an SSRF hole. Redirects go only to allowed hosts with public "
        "addresses.",
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=120, description="Seconds one image fetch may take.")

    def limits(self):
        from .http.images import ImageLimits

        return ImageLimits(
            max_per_request=self.max_per_request,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            allow_hosts=tuple(self.allow_hosts),
            fetch_timeout_s=self.fetch_timeout_s,
        )


class RouterConfig(BaseModel):
    """The OpenAI-compatible HTTP router."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(
        None, min_length=8, description="If set, /v1/* requires `Authorization: Bearer <api_key>`."
    )
    api_key_env: str | None = Field(
        None, description="Name of an environment variable holding the API key (keeps secrets out of YAML)."
    )
    max_request_body_bytes: int = Field(
        32 * 2**20,
        ge=1024,
        description="Larger request bodies are refused with 413. Images sent inline (base64) count: the default "
        "takes a few photos per request.",
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request still running after this long is aborted (504, or an error event)."
    )
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After seconds sent with 503 responses.")
    num_replicas: int = Field(1, ge=1, le=64, description="Router replicas (metrics are per replica).")
    gather_requests: bool = Field(
        True,
        description="Send a model's requests that arrive while the previous call to it is on its way together, "
        "in one call (a burst pays Ray Serve's per-call cost once). Only for models with one replica; a model "
        "with several routes each request by itself.",
    )
    num_cpus: float = Field(0.0, ge=0, description="CPUs Ray reserves per router replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources each router replica needs, e.g. {head: 1} to keep it on the node "
        "that runs the HTTP proxy (a router on a node that dies takes every model's requests with it).",
    )
    max_ongoing_requests: int = Field(
        512, ge=1, description="Requests one router replica handles at once (a stream holds one until it ends)."
    )
    response_store: ResponseStoreConfig = Field(
        default_factory=ResponseStoreConfig, description="Stored responses of /v1/responses (previous_response_id)."
    )
    images: ImagesConfig = Field(
        default_factory=ImagesConfig, description="Images in requests: limits, and the hosts URLs may name."
    )

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        return check_resources(v)

    @model_validator(mode="after")
    def _one_key_source(self) -> RouterConfig:
        if self.api_key and self.api_key_env:
            raise ValueError("give api_key or api_key_env, not both")
        return self

    def resolved_api_key(self) -> str | None:
        """The key, reading api_key_env in the router's process; refuses to run open if it is unset."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"router.api_key_env: environment variable {self.api_key_env} is not set "
                    "(set it where `serve run` starts, or drop api_key_env to run without a key)"
                )
            return key
        return self.api_key


class OrchardConfig(BaseModel):
    """Everything under `args:` of the application."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(min_length=1, description="The hosted models, routed by name.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="HTTP router options.")
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig, description="The memory budget all models of a host share."
    )

    @model_validator(mode="after")
    def _unique(self) -> OrchardConfig:
        for attr in ("name", "deployment_name"):
            seen: set[str] = set()
            for m in self.models:
                key = getattr(m, attr)
                if key in seen:
                    raise ValueError(f"two models share the {attr.replace('_', ' ')} {key!r}; names must be unique")
                seen.add(key)
        check_adapter_names(self.models)
        return self


def source_problem(source: str) -> str | None:
    """A cheap check that a source can be found, without loading anything. None when it looks fine."""
    if source.startswith(synthetic.PREFIX):
        known = synthetic.names()
        if source.removeprefix(synthetic.PREFIX) not in known:
            return f"{source!r}: no synthetic model of that name (known: {', '.join(known)})"
        return None
    if source.startswith("pkg://"):
        package, _, relative = source[len("pkg://") :].partition("/")
        if not package or not relative:
            return f"{source!r}: expected pkg://<package>/<file>"
        if importlib.util.find_spec(package) is None:
            return f"{source!r}: Python package {package!r} is not installed"
        return None
    path = Path(source).expanduser()
    if source.startswith(("/", "./", "../", "~")) or path.suffix.lower() == ".gguf":
        return None if path.exists() else f"{source!r}: no such file or directory"
    if path.exists() or source.count("/") == 1:
        return None
    return f"{source!r}: not a pkg:// source, a local path, an org/name repo id or a synthetic: model"


def embedding_source_problem(source: str) -> str | None:
    """The same cheap check for an embedding model's source (engine.loading.embedding_source's
    forms: a bundled name, pkg://…zip, a local model directory, a hub id). None when it looks fine."""
    from engine.loading.embedding_source import REQUIRED
    from engine.loading.sources import BUNDLED_EMBEDDINGS

    resolved = BUNDLED_EMBEDDINGS.get(source, source)
    if resolved.startswith("pkg://"):
        if not resolved.endswith(".zip"):
            return f"{source!r}: a packaged embedding model is a zipped model directory (pkg://<package>/<file>.zip)"
        return source_problem(resolved)
    path = Path(resolved).expanduser()
    if path.is_dir():
        missing = [name for name in REQUIRED if not (path / name).exists()]
        return f"{source!r}: not an embedding model directory (no {', '.join(missing)})" if missing else None
    if source.startswith(("/", "./", "../", "~")) or path.exists():
        return f"{source!r}: no such directory"
    if source.count("/") == 1:
        return None
    return (
        f"{source!r}: not an embedding model source: a bundled name ({', '.join(BUNDLED_EMBEDDINGS)}), "
        "pkg://<package>/<file>.zip, a local model directory or an org/name hub id"
    )


def format_validation_error(exc: ValidationError, root: str = "args") -> str:
    """One line per problem, each naming the field: `args.models[1].engine.block_size: ...`."""
    lines = []
    for err in exc.errors():
        where = root
        for part in err["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}"
        msg, got = problem_message(err), err.get("input")
        quiet = err["type"] in ("missing", "value_error") or "api_key" in where or isinstance(got, (dict, list))
        lines.append(f"{where}: {msg}" + ("" if quiet else f" (got {got!r})"))
    return "\n".join(lines)


class ConfigError(ValueError):
    """The application's args are invalid; the message names every bad field."""


def validate_args(args: dict | OrchardConfig | None) -> OrchardConfig:
    if isinstance(args, OrchardConfig):
        return args
    try:
        return OrchardConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError("invalid mlx-orchard application args:\n" + format_validation_error(exc)) from None


def check_serve_config(path: str) -> list[OrchardConfig]:
    """Validate the args of every mlx-orchard application in a Ray Serve config file."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    apps = [a for a in doc.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if not apps:
        raise ConfigError(f"{path}: no application with import_path {IMPORT_PATH}")
    return [validate_args(a.get("args")) for a in apps]


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print("usage: python -m deployments.config SERVE_CONFIG.yaml ...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            for cfg in check_serve_config(path):
                print(f"{path}: ok ({', '.join(m.name for m in cfg.models)})")
        except (ConfigError, OSError) as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
