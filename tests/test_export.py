"""florist export: merged HF weights and GGUF files, checked by round trips through transformers.

The GGUF round trip reads the file back with transformers' own GGUF loader (``gguf_file=``),
which undoes llama.cpp's q/k permutation independently of florist's writer. Logits on held-out
prompts must match the merged model's within 1e-5 relative (max |diff| / max |logit|) for f32
and 1e-2 for f16; q8_0 weights must equal an independent q8_0 rounding of the merged weights
(the >= 99% greedy agreement on a real model is in test_chat_e2e.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_helpers import CONVERSATION, NO_SYSTEM, tiny_base_with_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer

from florist.cli import main
from florist.data import Prompter, encode_prompt
from florist.export import merged_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A GGUF base, and an adapter on it (written by florist, as a run's adapter/ is)."""
    return tiny_base_with_adapter(tmp_path_factory.mktemp("export"), seed=1)


@pytest.fixture(autouse=True)
def _cache(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLORIST_CACHE", str(tiny["cache"]))  # the tiny base's conversion stays here


def heldout_prompts(tokenizer) -> torch.Tensor:
    """Held-out chat prompts as rendered for generation, left-padded into one batch."""
    from florist.generation import left_pad

    records = [{"messages": CONVERSATION}, {"messages": NO_SYSTEM}, {"messages": CONVERSATION[1:3]}]
    ids = [encode_prompt(r, tokenizer, Prompter()) for r in records]
    return left_pad(ids, tokenizer.pad_token_id)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-5), ("f16", 1e-2)])
def test_gguf_round_trip_logits(tiny: dict[str, Path], outtype: str, tolerance: float, capsys) -> None:
    out = tiny["root"] / f"model-{outtype}.gguf"
    args = ["export", str(tiny["adapter"]), "--format", "gguf", "--outtype", outtype, "--out", str(out)]
    assert main(args) == 0
    assert f"GGUF {outtype}" in capsys.readouterr().out
    merged, tokenizer, _ = merged_model(str(tiny["adapter"]))
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    # the rope base and the head dimension (not hidden/heads here) survive
    assert loaded.config.head_dim == merged.config.head_dim == 32
    assert loaded.config.rope_parameters["rope_theta"] == 50000.0
    ids, mask = heldout_prompts(tokenizer)
    with torch.no_grad():
        want = merged(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert relative(want[keep], got[keep]) <= tolerance
    # the base's tokenizer and chat template came along
    exported = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert exported.chat_template == tokenizer.chat_template
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert (
        exported(text, add_special_tokens=False)["input_ids"]
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def q8_0_reference(w: np.ndarray) -> np.ndarray:
    """llama.cpp's Q8_0, written out independently: per block of 32, d = max|x| / 127 stored as
    f16, q = round-half-away(x / d) in int8; the value read back is q * d."""
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, 0, blocks / d)
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)


def test_gguf_q8_0_holds_llama_cpp_blocks_of_the_merged_weights(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "model-q8_0.gguf"
    assert (
        main(["export", str(tiny["adapter"]), "--format", "gguf", "--outtype", "q8_0", "--out", str(out)])
        == 0
    )
    merged, tokenizer, _ = merged_model(str(tiny["adapter"]))
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    got = loaded.state_dict()
    for name, w in merged.state_dict().items():
        w = w.numpy()
        want = w if w.ndim == 1 else q8_0_reference(w)  # norms stay f32
        np.testing.assert_allclose(got[name].numpy(), want, rtol=0, atol=1e-6, err_msg=name)
    ids, mask = heldout_prompts(tokenizer)
    with torch.no_grad():
        close = relative(merged(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert close < 0.05


def test_hf_export_is_the_merged_model(tiny: dict[str, Path], capsys) -> None:
    out = tiny["root"] / "merged"
    assert main(["export", str(tiny["adapter"]), "--format", "hf", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    merged, tokenizer, _ = merged_model(str(tiny["adapter"]))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, w in merged.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    # a second export to the same place needs --force, and leaves the first intact meanwhile
    assert main(["export", str(tiny["adapter"]), "--format", "hf", "--out", str(out)]) == 2
    assert "already exists (pass --force" in capsys.readouterr().err


def test_export_refusals_are_one_line_and_write_nothing(tiny: dict[str, Path], capsys) -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from florist.models import byte_tokenizer, tiny_llama

    root = tiny["root"]
    model, tok = tiny_llama(seed=0)  # a Hugging Face base: its tokenizer has no GGUF description here
    model.save_pretrained(root / "hf-base")
    tok.save_pretrained(root / "hf-base")
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=260,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    mistral.save_pretrained(root / "mistral")
    byte_tokenizer().save_pretrained(root / "mistral")
    (root / "mistral" / "florist_source.json").write_text(json.dumps({"gguf": str(tiny["base"])}))
    capsys.readouterr()  # save_pretrained's progress bars
    cases = [
        (["export", str(root / "hf-base"), "--format", "gguf"], "convert_hf_to_gguf.py"),
        (["export", str(root / "mistral"), "--format", "gguf"], "Llama-architecture models, not 'mistral'"),
        (["export", str(tiny["adapter"]), "--format", "onnx"], "--format must be hf or gguf"),
        (
            ["export", str(tiny["adapter"]), "--format", "gguf", "--outtype", "q4_k"],
            "--outtype must be one of",
        ),
        (["export", str(root / "nowhere"), "--format", "hf"], "nowhere"),
    ]
    for args, message in cases:
        out = root / "refused.gguf"
        assert main([*args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
        assert not out.exists()
        assert not [p for p in root.iterdir() if p.name.startswith(".refused")]
