"""Model loading: bundled GGUF files, the MLX export, the fast CPU path and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.loading import cpu_fast_path
from engine.loading.gguf import unpermute_rope_rows
from engine.loading.loader import load_model, weights_dtype
from engine.loading.sources import resolve_source
from engine.prompts import encode_prompt
from engine.request import PromptInput

from ...conftest import GEMMA, SMOLLM


def test_bundled_sources_resolve_to_package_files():
    for name in (SMOLLM, GEMMA):
        resolved = resolve_source(name)
        assert resolved.kind == "gguf" and resolved.location.endswith(".gguf")


def test_fast_path_is_active_in_this_process(smollm):
    if cpu_fast_path.wants_fast_path() and cpu_fast_path.find_openblas():
        assert cpu_fast_path.openblas_loaded()
        assert smollm.fast_cpu and weights_dtype(smollm.model) == "float32"


def test_smollm_answers_paris_through_its_chat_template(smollm):
    ids = encode_prompt(
        smollm.tokenizer, PromptInput(messages=[{"role": "user", "content": "What is the capital of France?"}])
    )
    assert "Paris" in mlx_lm.generate(smollm.model, smollm.tokenizer, ids, max_tokens=12)


def test_export_is_an_mlx_directory_that_keeps_quantization(smollm, tmp_path):
    from engine.loading.gguf import export_mlx

    out = export_mlx(resolve_source(SMOLLM).location, tmp_path / "smollm")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["quantization"]["group_size"] == 32
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    model, tokenizer = mlx_lm.load(str(out))  # any MLX tool can open it
    assert weights_dtype(model) == "quantized 4-bit/8-bit"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt == encode_prompt(smollm.tokenizer, PromptInput(messages=[{"role": "user", "content": "Hi"}]))
    # The quantized export and the float32 fast path compute the same function.
    x = mx.array([prompt])
    top_q = mx.argmax(model(x)[0, -1]).item()
    top_f = mx.argmax(smollm.model(x)[0, -1]).item()
    assert top_q == top_f


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, head_dim, cols = 3, 8, 5
    w = np.arange(n_heads * head_dim * cols, dtype=np.float32).reshape(n_heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf.py permute()
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(np.array(unpermute_rope_rows(mx.array(permuted), n_heads)), w)


def test_missing_file_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/nonexistent/model.gguf")


def test_missing_package_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not installed"):
        load_model("pkg://no_such_package_xyz/model.gguf")


def test_truncated_file_is_a_clear_error(tmp_path):
    data = open(resolve_source(SMOLLM).location, "rb").read(3_000_000)
    (tmp_path / "cut.gguf").write_bytes(data)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(tmp_path / "cut.gguf"), cache_dir=tmp_path / "cache")


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        load_model(str(tmp_path / "gpt2.gguf"), cache_dir=tmp_path / "cache")


def test_hub_id_without_network_names_offline_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="Offline alternatives"):
        load_model("mlx-community/Qwen3-0.6B-8bit")


def test_two_processes_exporting_one_gguf_at_once_both_get_one_complete_export(tmp_path):
    """Two replicas starting together export into their own temporary directories; one rename wins."""
    code = (
        "import pathlib; from engine.loading.loader import _local_mlx_dir; from engine.loading.sources import resolve_source; "
        f"print(_local_mlx_dir(resolve_source({SMOLLM!r}), pathlib.Path({str(tmp_path)!r})))"
    )
    root = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    exported = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(exported) == 1
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [Path(exported.pop()).name]  # no .partial left
    mlx_lm.load(str(next((tmp_path / "gguf").iterdir())))
