"""``florist generate``: what a model, an adapter or a run answers.

    florist generate TARGET (--prompt TEXT | --input FILE) [--output out.jsonl] [--compare_base]
                            [--max_new_tokens 256] [--temperature 0] [--top_p 1] [--seed 42]

TARGET is what ``florist eval`` takes: a model (alias, directory, ``.gguf``), a PEFT adapter
directory, or a ``florist run`` (or Flower server) output directory. ``--input`` records are in
any data format florist trains on; the prompt is everything up to the last assistant turn (an
instruction record: its instruction and input), rendered as in training, and a record's own
answer is kept as the reference. Decoding is greedy unless ``--temperature`` is above 0, and
stops at the end of the assistant's turn. ``--compare_base`` also asks the base model (the
adapter switched off). Answers are printed, and written with ``--output`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from florist.cli.eval import add_target_flags
from florist.errors import FloristError
from florist.settings import DEVICE_PATTERN, DEVICE_WORDS, Setting, check_args

# Every flag's type and range, checked by florist.settings.check_args (one line naming the flag).
SAMPLING_FLAGS = {
    "--max_new_tokens": Setting(int, low=1),
    "--temperature": Setting(float, low=0),
    "--top_p": Setting(float, low=0, high=1, low_open=True),
    "--seed": Setting(int, low=0),
    "--device": Setting(str, pattern=DEVICE_PATTERN, described=DEVICE_WORDS),
}
FLAGS = {
    **SAMPLING_FLAGS,
    "--max_records": Setting(int, optional=True, low=1),
    "--batch_size": Setting(int, low=1),
}


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Target, device and sampling flags, shared with ``florist chat``."""
    add_target_flags(p)
    p.add_argument(
        "--max_new_tokens", "--max-new-tokens", default=256, help="answer length cap (default: 256)"
    )
    p.add_argument("--temperature", default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", "--top-p", default=1.0, help="nucleus sampling mass (default: 1)")
    p.add_argument("--seed", default=42, help="sampling seed (default: 42)")
    p.add_argument(
        "--template",
        default=None,
        help="auto | chat | alpaca | a JSON template (default: the run's prompt_template_name, else auto)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answers of a model, adapter or run to prompts (optionally beside the base model's)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_flags(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt (a user turn, or an instruction for Alpaca runs)")
    source.add_argument("--input", help="a data file (any florist format); answers may be missing")
    p.add_argument("--output", default=None, help="write the answers here as JSON lines")
    p.add_argument(
        "--compare_base", "--compare-base", action="store_true", help="also the base model's answer"
    )
    p.add_argument("--max_records", "--max-records", default=None, help="the first N input records")
    p.add_argument("--batch_size", "--batch-size", default=8, help="prompts per batch (default: 8)")
    p.set_defaults(func=run)


def sampling_from(args: argparse.Namespace) -> Any:
    from florist.generation import Sampling

    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def run(args: argparse.Namespace) -> int:
    check_args(args, FLAGS)  # before the imports: bad flags answer at once
    from florist.data import load_dataset_file
    from florist.generation import format_answers

    # Read and check the input before the (slow) model load, so bad input fails at once.
    records = None
    if args.input is not None:
        records, _fmt = load_dataset_file(args.input, prompts=True)
        records = records[: args.max_records]
    rows = answer(args, records)
    for row in rows:
        print(format_answers(row))
    if args.output:
        from florist.io import atomic_write_text

        atomic_write_text(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"answers: {args.output}")
    return 0


def answer(args: argparse.Namespace, records: list[dict] | None) -> list[dict[str, Any]]:
    """The rows florist.generation.answer_records makes, for the prompt or records given."""
    from florist.generation import answer_records, load_for_generation, prompter_for, text_record

    sampling = sampling_from(args)
    loaded = load_for_generation(args.target, base=args.base, device=args.device)
    if args.compare_base and not loaded.has_adapter:
        raise FloristError(f"--compare_base: {args.target} is a model, not an adapter or a run")
    prompter = prompter_for(loaded, args.template)
    if records is None:
        records = [text_record(args.prompt, loaded, prompter)]
    return answer_records(
        loaded, records, prompter, sampling, compare_base=args.compare_base, batch_size=args.batch_size
    )
