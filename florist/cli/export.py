"""``florist export``: a model, an adapter or a run as merged weights or one GGUF file.

    florist export TARGET --format hf|gguf --out PATH [--outtype f32|f16|q8_0] [--base MODEL] [--force]

TARGET is what ``florist eval`` takes: a model, a PEFT adapter directory, or a ``florist run`` or
Flower server output directory (its ``adapter/`` on the run's base model). The adapter is folded
into the base in float32, then written:

- ``hf``: a Hugging Face directory (safetensors, config, tokenizer), for any base;
- ``gguf``: one file for llama.cpp and Ollama (``--outtype``, default f16), for Llama-architecture
  bases that came from a GGUF file (the embedded SmolLM2 does), whose tokenizer and chat template
  it copies. Other bases: ``--format hf``, then llama.cpp's ``convert_hf_to_gguf.py``.

The output appears whole or not at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from florist.cli.eval import add_target_flags
from florist.errors import FloristError
from florist.settings import Setting, check_args

FORMATS = ("hf", "gguf")
OUTTYPES = ("f32", "f16", "q8_0")
FLAGS = {"--format": Setting(str, choices=FORMATS), "--outtype": Setting(str, choices=OUTTYPES)}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="merged Hugging Face weights or a GGUF file (llama.cpp, Ollama) of a model, adapter or run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_flags(p)
    p.add_argument("--format", required=True, help="hf or gguf")
    p.add_argument("--out", required=True, help="output directory (hf) or file (gguf)")
    p.add_argument("--outtype", default="f16", help="gguf: f32, f16 (default) or q8_0")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_args(args, FLAGS)  # flags first, before the imports and the model load
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FloristError(f"{out}: already exists (pass --force to replace it)")
    if args.format == "gguf" and out.is_dir():
        raise FloristError(f"{out}: is a directory; --format gguf writes one file, e.g. {out / 'model.gguf'}")

    from florist.cli.eval import resolve_target
    from florist.export import check_gguf_base, export_gguf, export_hf, merged_model

    if args.format == "gguf":  # a base florist cannot describe in GGUF is refused before loading it
        check_gguf_base(resolve_target(args.target, args.base).base)
    model, tokenizer, target = merged_model(args.target, base=args.base)
    what = f"{target.base}" + (f" + {target.adapter}" if target.adapter is not None else "")
    if args.format == "hf":
        export_hf(model, tokenizer, out)
        print(f"wrote {out}: {what}, merged (safetensors, float32) with its tokenizer")
        return 0
    export_gguf(model, target.base, out, outtype=args.outtype)
    size = out.stat().st_size / 1e6
    print(f"wrote {out}: {what}, merged, GGUF {args.outtype} ({size:.1f} MB), tokenizer from the base's GGUF")
    return 0
