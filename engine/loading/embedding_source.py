"""Embedding-model sources → a local sentence-transformers-style directory.

Accepted forms:
  all-minilm-l6-v2                a bundled name (sources.BUNDLED_EMBEDDINGS)
  pkg://<package>/<file>.zip      a zipped model directory shipped in a Python package, unzipped
                                  once into the cache (<cache>/zip/<package>-<size>-<mtime>/)
  /path/to/dir                    a local directory: config.json, *.safetensors, tokenizer.json,
                                  optionally modules.json, 1_Pooling/config.json, sentence_bert_config.json
  org/name                        a hub repo id (the local Hugging Face cache, or a download)
"""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from pathlib import Path

from ..errors import ModelLoadError
from .sources import BUNDLED_EMBEDDINGS, package_file

log = logging.getLogger(__name__)

REQUIRED = ("config.json", "tokenizer.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "1_Pooling/*"]


def embedding_model_dir(source: str, cache_dir: Path) -> Path:
    """The local directory of an embedding model, unzipping or downloading it first if need be."""
    source = BUNDLED_EMBEDDINGS.get(source, source)
    if source.startswith("pkg://"):
        path = package_file(source)
        directory = _unzipped(path, cache_dir) if path.suffix == ".zip" else path
    elif Path(source).expanduser().is_dir():
        directory = Path(source).expanduser()
    elif source.count("/") == 1 and not source.startswith(("/", ".", "~")):
        directory = _hub_dir(source)
    else:
        raise ModelLoadError(
            f"cannot interpret embedding model source {source!r}: a bundled name "
            f"({', '.join(BUNDLED_EMBEDDINGS)}), pkg://<package>/<file>.zip, a local directory or a hub id"
        )
    missing = [name for name in REQUIRED if not (directory / name).exists()]
    if missing or not any(directory.glob("*.safetensors")):
        raise ModelLoadError(
            f"{directory} is not an embedding model directory: missing {', '.join(missing) or '*.safetensors'}"
        )
    return directory


def _unzipped(zip_path: Path, cache_dir: Path) -> Path:
    """Unzip once: into a temporary sibling, renamed into place when complete (two processes that
    race both unzip, one rename wins)."""
    stat = zip_path.stat()
    target = cache_dir / "zip" / f"{zip_path.parent.name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").exists():
        return target
    log.info("unzipping %s into %s (once)", zip_path, target)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(partial)
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{zip_path} is not a readable zip: {exc}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _hub_dir(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, HTTP errors: one message
        raise ModelLoadError(
            f"embedding model {repo_id!r} is not in the local hub cache and could not be fetched: {exc}"
        ) from exc
