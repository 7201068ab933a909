"""Builds florist/resources/chat/conversations.jsonl from the built-in demo instruction data.

The conversations are florist's own demo records (florist/resources/demo, written for florist),
chained into multi-turn chats in TRL's ``messages`` format: within each category, records are
taken in order as conversations of 2, 1, 3 and 2 user turns (repeating), and every other
conversation opens with a category-specific system message (the others get the template's
default system prompt). Deterministic: running it again writes the same file.

    python bench/chat_demo_data.py
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from florist.data import demo_data_path, load_dataset_file
from florist.io import atomic_write_text

SYSTEM = {
    "arithmetic": "You are a maths tutor. Give the calculation, then the answer.",
    "geography": "You answer geography questions in one clear sentence.",
    "unit_conversion": "You convert units and give the result with its unit.",
    "grammar": "You are an English teacher. Answer briefly and exactly.",
    "summarization": "You summarise a text in one sentence.",
    "sentiment": "You label the sentiment of a sentence as positive, negative or neutral.",
    "python": "You are a Python mentor. Answer with short, correct code.",
    "science": "You explain science simply, in a sentence or two.",
}
TURNS = (2, 1, 3, 2)
OUT = Path(__file__).resolve().parents[1] / "florist" / "resources" / "chat" / "conversations.jsonl"


def user_text(record: dict) -> str:
    return record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")


def build() -> list[dict]:
    directory = demo_data_path() / "8"
    records = []
    for path in sorted(directory.glob("*.json")):
        records += load_dataset_file(path)[0]
    by_category: dict[str, list[dict]] = {}
    for r in records:
        by_category.setdefault(r["category"], []).append(r)
    conversations = []
    for category in SYSTEM:
        rows = sorted(by_category[category], key=lambda r: r["instruction"])
        sizes = itertools.cycle(TURNS)
        start, n = 0, 0
        while start < len(rows):
            size = next(sizes)
            chunk = rows[start : start + size]
            messages = [{"role": "system", "content": SYSTEM[category]}] if n % 2 == 0 else []
            for r in chunk:
                messages += [
                    {"role": "user", "content": user_text(r)},
                    {"role": "assistant", "content": r["output"]},
                ]
            conversations.append({"messages": messages, "category": category})
            start, n = start + size, n + 1
    return conversations


if __name__ == "__main__":
    rows = build()
    atomic_write_text(OUT, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {OUT}: {len(rows)} conversations")
