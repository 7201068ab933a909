"""The ``florist`` command. Each subcommand lives in its own module under florist/cli/."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines add_parser(subparsers), which registers its subcommand and sets
# ``func`` (args -> exit code) as the parser default.
SUBCOMMANDS = [
    "aggregate",
    "run",
    "demo",
    "data",
    "eval",
    "sweep",
    "report",
    "flower",
    "generate",
    "chat",
    "export",
]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All subcommands, or only ``command``'s: its module alone is imported, so that
    `florist aggregate --help` does not wait for the imports of every other subcommand."""
    parser = argparse.ArgumentParser(prog="florist", description="Federated fine-tuning of LLMs with LoRA.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in [command] if command in SUBCOMMANDS else SUBCOMMANDS:
        module_name = f"florist.cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue  # subcommand not built yet
            raise
        module.add_parser(sub)
    from florist.settings import one_line_errors

    for p in [parser, *sub.choices.values()]:  # an unknown flag is one line too, not the usage text
        one_line_errors(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from florist.errors import run_cli

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
