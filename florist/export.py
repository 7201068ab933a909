"""Ship a fine-tuned model: merged Hugging Face weights, or one GGUF file for llama.cpp and Ollama.

The adapter of a model, an adapter directory or a run (``florist run`` or a Flower server's
output) is folded into its base in float32 (peft's ``merge_and_unload``), then written

- ``hf``: ``save_pretrained`` safetensors plus the tokenizer, for any base;
- ``gguf``: for Llama-architecture bases, by the ``gguf`` package's ``GGUFWriter`` with its
  tensor-name map, as llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama: q and k rows
  permuted into llama.cpp's rotary layout, the rope base and head dimension kept, 1-D tensors
  (norms) in f32 and matrices in the chosen ``outtype`` (f32, f16 or q8_0; a matrix whose rows
  are not a whole number of q8_0 blocks falls back to f16, as llama.cpp's converter does).

A GGUF file must describe its tokenizer too. florist copies that description (vocabulary,
merges, special tokens, pre-tokenizer and chat template) from the base's own GGUF file, so the
exported model tokenises exactly as the base did in llama.cpp. A base that did not come from a
GGUF file is refused: its tokenizer's GGUF description (notably llama.cpp's pre-tokenizer name,
which llama.cpp's converter identifies by hashing test tokenisations) is llama.cpp's own to
make, so the way is ``--format hf`` and llama.cpp's ``convert_hf_to_gguf.py`` on that directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from florist.errors import FloristError
from florist.io import atomic_directory, atomic_file

FORMATS = ("hf", "gguf")
OUTTYPES = ("f32", "f16", "q8_0")
CONVERTER = "llama.cpp's convert_hf_to_gguf.py"


class ExportError(FloristError):
    """A model florist cannot export in the requested format; the message says what to do."""


# --- the merged model ----------------------------------------------------------------------


def merged_model(target: str, *, base: str | None = None, device: str = "cpu") -> tuple[Any, Any, Any]:
    """(model with the target's adapter folded in, tokenizer, resolved target), in float32."""
    from florist.cli.eval import load_target, resolve_target

    resolved = resolve_target(target, base)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model, tokenizer = load_target(resolved, device=device, dtype=torch.float32)
    return model, tokenizer, resolved


def source_gguf(base: str) -> Path | None:
    """The GGUF file ``base`` was loaded from: an alias or a path to one, or florist's cached
    conversion of one (which records its source); None for any other base."""
    from florist.models import resolve_model_name

    source = resolve_model_name(base)
    if source.lower().endswith(".gguf"):
        return Path(source).expanduser()
    record = Path(source).expanduser() / "florist_source.json"
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            path = Path(json.loads(record.read_text())["gguf"])
            return path if path.is_file() else None
    return None


def export_hf(model: Any, tokenizer: Any, out: str | os.PathLike[str]) -> Path:
    """``out/``: safetensors weights, config and tokenizer, written in one atomic step."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)


# --- GGUF ----------------------------------------------------------------------------------


def llama_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute): within each head,
    the two rotary halves interleaved, as its rope kernel reads them."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope(config: Any) -> tuple[float, str]:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type") or (getattr(config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    return float(theta if theta is not None else 10000.0), str(kind)


def gguf_source_of(base: str) -> Path:
    """The base's own GGUF file, whose tokenizer description the export copies; refused in one
    line (naming llama.cpp's converter) for a base that did not come from one."""
    source = source_gguf(base)
    if source is None:
        raise ExportError(
            f"{base}: florist describes the tokenizer in GGUF by copying the base's own GGUF file, and "
            f"this base is not one; export --format hf and convert that directory with {CONVERTER}"
        )
    return source


def check_gguf_base(base: str) -> None:
    """What can be refused before loading the base: no GGUF source, or (for a base kept as a
    directory) an architecture or rope the writer does not describe."""
    from transformers import AutoConfig

    from florist.models import resolve_model_name

    gguf_source_of(base)
    directory = Path(resolve_model_name(base)).expanduser()
    if (directory / "config.json").is_file():
        check_gguf_model(AutoConfig.from_pretrained(directory), base)


def check_gguf_model(config: Any, base: str) -> None:
    """Refuse, in one line naming the way out, a model florist's GGUF writer cannot describe."""
    if config.model_type != "llama":
        raise ExportError(
            f"{base}: --format gguf writes Llama-architecture models, not {config.model_type!r}; "
            f"export --format hf and convert that directory with {CONVERTER}"
        )
    _theta, kind = _rope(config)
    if kind != "default":
        raise ExportError(
            f"{base}: rope scaling {kind!r} is not written by florist's GGUF export; export --format hf "
            f"and convert that directory with {CONVERTER}"
        )


def tokenizer_fields(gguf_path: Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a GGUF file, {key: (value, type, sub_type)}, and under the
    key "general.name" the model's name (one read: parsing a 49k-token vocabulary takes seconds)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(gguf_path)
    fields = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key == "general.name":
            main = field.types[0]
            sub = field.types[-1] if main == GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), main, sub)
    return fields


def gguf_tensors(model: Any, outtype: str) -> Iterator[tuple[str, np.ndarray, Any]]:
    """(GGUF name, data, raw dtype or None) for every weight, permuted and converted."""
    import gguf

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"{key}: no GGUF name for this tensor in llama.cpp's Llama layout; use {CONVERTER}"
            )
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, n_head)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, n_kv)
        yield name, *_converted(data, outtype)


def _converted(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    if data.ndim == 1 or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0] == 0:
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(
    model: Any,
    path: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    tokenizer: dict[str, Any],
    name: str = "florist export",
) -> Path:
    """Write a Llama ``model`` as one GGUF file with the given tokenizer.* metadata, atomically."""
    import gguf

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    config = model.config
    vocab = int(model.get_input_embeddings().weight.shape[0])
    tokens = tokenizer.get("tokenizer.ggml.tokens", ([],))[0]
    if len(tokens) != vocab:
        raise ExportError(
            f"the model has {vocab} token embeddings but the tokenizer metadata lists {len(tokens)} tokens "
            f"(was the vocabulary changed?); use {CONVERTER}"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, _kind = _rope(config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type["q8_0"] = gguf.LlamaFileType.MOSTLY_Q8_0
    path = Path(path)
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama", use_temp_file=True)
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_vocab_size(vocab)
        writer.add_file_type(file_type[outtype])
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub_type) in tokenizer.items():
            writer.add_key_value(key, value, vtype, sub_type=sub_type)
        for tensor_name, data, raw_dtype in gguf_tensors(model, outtype):
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        show = os.environ.get("FLORIST_PROGRESS") != "0" and sys.stderr.isatty()
        writer.write_tensors_to_file(progress=show)
        writer.close()
    return path


def export_gguf(model: Any, base: str, out: str | os.PathLike[str], *, outtype: str = "f16") -> Path:
    """The merged ``model`` (on ``base``) as one GGUF file at ``out``, tokenizer copied from the base's GGUF."""
    source = gguf_source_of(base)
    check_gguf_model(model.config, base)
    fields = tokenizer_fields(source)
    name = fields.pop("general.name", ("florist export",))[0]
    return write_gguf(model, out, outtype=outtype, tokenizer=fields, name=f"{name} (florist)")
