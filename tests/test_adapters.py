"""florist.adapters against real peft: what peft writes we read exactly, what we write peft loads exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from florist.adapters import (
    AdapterError,
    read_client_info,
    read_num_examples,
    read_peft_adapter,
    safe_join,
    sanitize_client_id,
    write_peft_adapter,
)
from florist.aggregation.base import LoraFactors

CONFIG = LlamaConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
CONFIG_OUT = {Q0: 64, V0: 32, Q1: 64, V1: 32}  # v_proj: 2 kv heads x 16


def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def randomize_lora(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def peft_layers(model: PeftModel) -> dict[str, nn.Module]:
    inner = model.base_model.model
    return {name: m for name, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def save_peft_client(directory: Path, lora_config: LoraConfig, seed: int = 1) -> PeftModel:
    model = get_peft_model(tiny_base(), lora_config)
    randomize_lora(model, seed)
    model.save_pretrained(str(directory))
    return model


def test_reads_what_peft_writes(tmp_path: Path) -> None:
    model = save_peft_client(tmp_path, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter, config = read_peft_adapter(tmp_path)
    layers = peft_layers(model)
    assert sorted(adapter) == sorted(layers) == sorted([Q0, V0, Q1, V1])
    for name, layer in layers.items():
        assert torch.equal(adapter[name].A, layer.lora_A["default"].weight.detach())
        assert torch.equal(adapter[name].B, layer.lora_B["default"].weight.detach())
        assert adapter[name].scaling == layer.scaling["default"] == 2.0
    assert config["r"] == 4 and config["peft_type"] == "LORA"


def test_rank_alpha_patterns_and_rslora_match_peft(tmp_path: Path) -> None:
    for use_rslora in (False, True):
        lora_config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={Q1: 6, "v_proj": 2},
            alpha_pattern={V0: 3},
            use_rslora=use_rslora,
        )
        directory = tmp_path / f"rslora{use_rslora}"
        model = save_peft_client(directory, lora_config)
        adapter, _ = read_peft_adapter(directory)
        for name, layer in peft_layers(model).items():
            assert adapter[name].rank == layer.r["default"]
            assert adapter[name].scaling == pytest.approx(layer.scaling["default"], rel=1e-15)
        assert adapter[Q1].rank == 6 and adapter[V0].rank == 2
        expected = 3 / math.sqrt(2) if use_rslora else 3 / 2
        assert adapter[V0].scaling == pytest.approx(expected)


def test_accepts_default_adapter_name_and_widens_half_precision(tmp_path: Path) -> None:
    save_peft_client(tmp_path, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    weights = tmp_path / "adapter_model.safetensors"
    original = load_file(weights)
    renamed = {}
    for i, (key, value) in enumerate(sorted(original.items())):
        dtype = (torch.float16, torch.bfloat16, torch.float64, torch.float32)[i % 4]
        renamed[key.replace(".weight", ".default.weight")] = value.to(dtype)
    save_file(renamed, weights)
    adapter, _ = read_peft_adapter(tmp_path)
    for key, value in renamed.items():
        name, factor = key.removeprefix("base_model.model.").split(".lora_")
        got = getattr(adapter[name], factor[0])
        assert got.dtype == (torch.float64 if value.dtype == torch.float64 else torch.float32)
        assert torch.equal(got, value.to(got.dtype))


def _hand_merged_logits(adapter: dict[str, LoraFactors], ids: torch.Tensor) -> torch.Tensor:
    model = tiny_base()
    with torch.no_grad():
        for name, f in adapter.items():
            weight = model.get_submodule(name).weight
            weight += (f.scaling * f.B.double() @ f.A.double()).to(weight.dtype)
        return model(ids).logits


def test_written_adapter_loads_in_peft_with_exact_ranks_and_scalings(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    ranks_scalings = {Q0: (5, 0.1), V0: (3, 3.7), Q1: (5, 1 / 3), V1: (8, 2.0)}
    adapter = {
        name: LoraFactors(
            A=torch.randn(r, 64, generator=g), B=torch.randn(CONFIG_OUT[name], r, generator=g), scaling=s
        )
        for name, (r, s) in ranks_scalings.items()
    }
    write_peft_adapter(
        tmp_path / "out", adapter, base_model_name_or_path="tiny", extra_files={"note.json": {"a": 1}}
    )
    assert json.loads((tmp_path / "out" / "note.json").read_text()) == {"a": 1}
    model = PeftModel.from_pretrained(tiny_base(), str(tmp_path / "out")).eval()
    for name, layer in peft_layers(model).items():
        r, s = ranks_scalings[name]
        assert layer.r["default"] == r
        assert layer.scaling["default"] == pytest.approx(s, rel=1e-15)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _hand_merged_logits(adapter, ids), rtol=1e-5, atol=1e-5)
    # ... and reading it back gives the same adapter.
    back, config = read_peft_adapter(tmp_path / "out")
    assert config["base_model_name_or_path"] == "tiny"
    for name, f in adapter.items():
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B)
        assert back[name].scaling == pytest.approx(f.scaling, rel=1e-15)


class _Toy(nn.Module):
    """Module names where one full name, read as peft's regex, also matches another ("a.q" ~ "a_q")."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Module()
        self.a.q = nn.Linear(6, 5, bias=False)
        self.a_q = nn.Linear(6, 5, bias=False)
        self.b = nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a.q(x) + 2 * self.a_q(x) + 3 * self.b(x)


def test_pattern_keys_are_unambiguous_under_peft_regex_matching(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    spec = {"a.q": (2, 0.5), "a_q": (3, 1.5), "b": (4, 1.0)}
    adapter = {
        n: LoraFactors(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g), s)
        for n, (r, s) in spec.items()
    }
    write_peft_adapter(tmp_path, adapter, task_type=None)
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(_Toy(), str(tmp_path))
    for name, layer in peft_layers(model).items():
        assert (layer.r["default"], layer.scaling["default"]) == spec[name]
    back, _ = read_peft_adapter(tmp_path)
    assert {n: (f.rank, f.scaling) for n, f in back.items()} == spec


def test_write_is_atomic_and_rejects_bad_adapters(tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = {"m": LoraFactors(torch.ones(2, 3), torch.ones(4, 2), 1.0)}
    write_peft_adapter(out, good)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(AdapterError, match="'m'.*scaling"):
        write_peft_adapter(out, {"m": LoraFactors(torch.ones(2, 3), torch.ones(4, 2), float("nan"))})
    with pytest.raises(AdapterError, match="unsafe file name"):
        write_peft_adapter(out, good, extra_files={"../escape.json": {}})
    assert sorted(p.name for p in out.iterdir()) == before
    assert not (tmp_path / "escape.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


# --- untrusted input -----------------------------------------------------------------------


@pytest.fixture
def client(tmp_path: Path) -> Path:
    directory = tmp_path / "client_x"
    save_peft_client(directory, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return directory


def _edit(directory: Path, fn) -> None:
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(weights)
    fn(tensors)
    save_file(tensors, weights)


def _key(name: str, factor: str) -> str:
    return f"base_model.model.{name}.lora_{factor}.weight"


def _set(name: str, factor: str, value) -> object:
    def fn(t: dict) -> None:
        t[_key(name, factor)] = value(t[_key(name, factor)]) if callable(value) else value

    return fn


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


BAD_TENSORS = {
    "rank mismatch": _set(Q1, "B", lambda t: t[:, :3].contiguous()),
    "NaN or Inf": _set(V0, "A", _nan),
    "floating point": _set(Q1, "A", lambda t: t.to(torch.int32)),
    "must be a matrix": _set(Q1, "A", lambda t: t.reshape(2, 2, 64)),
    "without its lora_B": lambda t: t.pop(_key(Q1, "B")),
    "unexpected tensor": lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
    "rank 2 in adapter_model.safetensors but 4": lambda t: t.update(
        {
            _key(Q1, "A"): t[_key(Q1, "A")][:2].contiguous(),
            _key(Q1, "B"): t[_key(Q1, "B")][:, :2].contiguous(),
        }
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_TENSORS))
def test_bad_tensors_are_refused_naming_directory_client_and_module(client: Path, problem: str) -> None:
    _edit(client, BAD_TENSORS[problem])
    with pytest.raises(AdapterError, match=problem) as info:
        read_peft_adapter(client, client_id="hospital-7")
    message = str(info.value)
    assert str(client) in message and "hospital-7" in message
    if problem != "unexpected tensor":
        assert "module 'model.layers." in message


def _garbage_header(path: Path) -> None:
    path.write_bytes((10**6).to_bytes(8, "little") + b"{not json" + b"\0" * 64)


BAD_FILES = {
    "missing adapter_model.safetensors": lambda d: (d / "adapter_model.safetensors").unlink(),
    "missing adapter_config.json": lambda d: (d / "adapter_config.json").unlink(),
    "not a valid safetensors": lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]
    ),
    "not a valid safetensors ": lambda d: _garbage_header(d / "adapter_model.safetensors"),
    "not valid JSON": lambda d: (d / "adapter_config.json").write_text('{"r": 4,'),
    "peft_type": lambda d: (d / "adapter_config.json").write_text('{"peft_type": "IA3", "r": 4}'),
    "use_dora": lambda d: (d / "adapter_config.json").write_text(
        '{"r": 4, "lora_alpha": 8, "use_dora": true}'
    ),
    "'r' must be a positive integer": lambda d: (d / "adapter_config.json").write_text('{"r": 0}'),
}


@pytest.mark.parametrize("problem", sorted(BAD_FILES))
def test_bad_files_are_refused_naming_the_directory(client: Path, problem: str) -> None:
    BAD_FILES[problem](client)
    with pytest.raises(AdapterError, match=problem.strip()) as info:
        read_peft_adapter(client)
    assert str(client) in str(info.value)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not found"):
        read_peft_adapter(tmp_path / "nope", client_id="c1")


def test_size_limit_is_checked_before_reading(client: Path) -> None:
    size = (client / "adapter_model.safetensors").stat().st_size
    read_peft_adapter(client, max_bytes=size)
    with pytest.raises(AdapterError, match=f"{size} bytes, more than the limit of {size - 1}"):
        read_peft_adapter(client, max_bytes=size - 1)


class _Bomb:
    """Unpickling this creates ``marker``: proof of whether a pickle was ever loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (str(self.marker),))


def test_pickle_adapter_is_refused_without_unpickling(client: Path, tmp_path: Path) -> None:
    # Control: the payload really does run code when loaded the unsafe way.
    control = tmp_path / "control_marker"
    torch.save({"x": _Bomb(control)}, tmp_path / "control.bin")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    (client / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": _Bomb(marker)}, client / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.bin.*pickle.*refused"):
        read_peft_adapter(client)
    assert not marker.exists()


def test_expected_shapes(client: Path) -> None:
    shapes = {Q0: (64, 64), V0: (32, 64), Q1: (64, 64), V1: (32, 64)}
    read_peft_adapter(client, expected_shapes=shapes)
    with pytest.raises(AdapterError, match=r"module 'model.layers.0.self_attn.v_proj'.*32x64.*33x64"):
        read_peft_adapter(client, expected_shapes={**shapes, V0: (33, 64)})
    with pytest.raises(AdapterError, match="has no such module"):
        read_peft_adapter(client, expected_shapes={Q0: (64, 64)})


def test_num_examples_files(tmp_path: Path) -> None:
    assert read_num_examples(tmp_path) is None
    (tmp_path / "num_examples.json").write_text("17")
    assert read_num_examples(tmp_path) == 17
    (tmp_path / "florist_client.json").write_text('{"num_examples": 1579, "client_id": "c-1"}')
    assert read_num_examples(tmp_path) == 1579  # florist_client.json takes precedence
    assert read_client_info(tmp_path)["client_id"] == "c-1"
    for bad in ("0", "-3", '"12"', "true", "1.5", '{"n": 3}', "{"):
        (tmp_path / "florist_client.json").write_text(bad)
        with pytest.raises(AdapterError, match=str(tmp_path)):
            read_num_examples(tmp_path)
    (tmp_path / "florist_client.json").write_text('{"num_examples": 3, "client_id": "../../etc"}')
    with pytest.raises(AdapterError, match="unsafe client id '../../etc'"):
        read_client_info(tmp_path)


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "/etc/passwd", "a/b", "a\\b", "a\x00b", ".hidden", "x" * 129, 7]
)
def test_sanitize_client_id_rejects_unsafe_ids(bad: object) -> None:
    with pytest.raises(AdapterError, match="unsafe client id"):
        sanitize_client_id(bad)


def test_sanitize_client_id_and_safe_join_accept_ordinary_names(tmp_path: Path) -> None:
    for good in ("client_0", "hospital-7.eu", "node@42", "A" * 128):
        assert sanitize_client_id(good) == good
    assert (
        safe_join(tmp_path, "client_0", "adapter_model.safetensors")
        == tmp_path / "client_0" / "adapter_model.safetensors"
    )


@pytest.mark.parametrize("bad", ["..", "../x", "/abs", "a/b", "", "a\x00"])
def test_safe_join_refuses_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(AdapterError):
        safe_join(tmp_path, bad)


def test_safe_join_refuses_symlinks_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(AdapterError, match="escapes"):
        safe_join(root, "link", "x")


def test_written_config_is_byte_stable_whatever_the_hash_seed(tmp_path: Path) -> None:
    # peft holds target_modules in a set; saved as-is, its order changes with PYTHONHASHSEED and a
    # resumed run would write a different adapter_config.json than the uninterrupted one.
    adapter = {Q0: LoraFactors(A=torch.ones(2, 64), B=torch.ones(64, 2), scaling=1.0)}
    targets = ["v_proj", "q_proj", "up_proj", "k_proj", "o_proj", "down_proj", "gate_proj"]
    write_peft_adapter(tmp_path / "out", adapter, base_model_name_or_path="tiny", target_modules=targets)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(targets)
