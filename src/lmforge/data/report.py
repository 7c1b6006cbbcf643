"""The curation report of `lmforge prepare`: counts per rule, duplicates, PII, decontamination, samples.

`Sampler` keeps a seeded random sample in bounded memory that does not depend on arrival order (the N
documents with the smallest keyed hash), so 1 and N workers pick the same documents. `render_markdown`
turns report.json into report.md for people.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import Any


class Sampler:
    """The `size` items with the smallest BLAKE2b(seed, id): a uniform sample, deterministic, O(size) memory."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.salt = f"{seed}:".encode()
        self._heap: list[tuple[int, str, dict[str, Any]]] = []  # max-heap on the key via negation

    def offer(self, doc_id: str, item: dict[str, Any]) -> None:
        if self.size <= 0:
            return
        key = int.from_bytes(hashlib.blake2b(self.salt + doc_id.encode(), digest_size=8).digest(), "big")
        entry = (-key, doc_id, item)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        elif -key > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def items(self) -> list[dict[str, Any]]:
        return [item for _, _, item in sorted(self._heap, key=lambda e: (-e[0], e[1]))]


def truncate(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[:chars] + f" [... {len(text) - chars} more characters]"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _quote(text: str) -> list[str]:
    return ["```text", text.replace("```", "'''"), "```"]


def render_markdown(r: dict[str, Any]) -> str:
    docs, inp, by = r["documents"], r["inputs"], r["bytes"]
    lines = [
        "# lmforge prepare report",
        "",
        f"{docs['in']:,} documents in, {docs['out']:,} out ({by['in'] / 1e6:.2f} MB in, {by['out'] / 1e6:.2f} MB "
        f"out) from {inp['files']:,} files; {inp['files_skipped_total']:,} files and {inp['bad_lines']:,} lines skipped.",
        "",
        "## Documents in and out per rule",
        "",
        *_table(
            ["rule", "in", "dropped", "out"],
            [[x["rule"], x["in"], x["dropped"], x["out"]] for x in r["rules"]],
        ),
        "",
    ]
    if inp["skipped"]:
        lines += ["## Skipped input", ""]
        lines += _table(
            ["where", "reason", "detail"], [[s["where"], s["reason"], s["detail"]] for s in inp["skipped"]]
        )
        lines.append("")
    bp = r["boilerplate"]
    lines += [
        f"Boilerplate: {bp['docs']:,} documents had {bp['chars_removed']:,} characters of header/footer removed.",
        "",
    ]
    d = r["dedup"]
    lines += [
        "## Duplicates",
        "",
        f"{d['exact_duplicates']:,} exact and {d['near_duplicates']:,} near duplicates in {d['clusters']:,} clusters "
        f"(MinHash {d['num_perm']} permutations, {d['bands']} bands x {d['rows']} rows, {d['shingle']} {d['ngram']}-grams"
        f"{', spelling folded' if d['fold_spelling'] else ''}, threshold {d['threshold']}; "
        f"{d['candidate_pairs']:,} candidate pairs verified).",
        "",
    ]
    for c in d["largest_clusters"]:
        lines.append(
            f"- kept `{c['kept']['id']}`; dropped "
            + ", ".join(f"`{m['id']}` ({m['kind'].split('_')[0]}, J≈{m['similarity']})" for m in c["dropped"])
        )
    lines += ["", "## PII masked", ""]
    lines += _table(["kind", "count"], [[k, v] for k, v in r["pii"]["counts"].items()])
    lines += ["", f"{r['pii']['docs']:,} documents had PII masked.", ""]
    dc = r["decontam"]
    if dc["enabled"]:
        lines += [
            "## Decontamination",
            "",
            f"{dc['docs_hit']:,} documents share {dc['ngram']}-grams with {len(dc['eval_files'])} eval files "
            f"({dc['ngrams_hit']:,} n-gram hits; mode {dc['mode']}).",
            "",
        ]
    lines += ["## Sample of kept documents", ""]
    for s in r["sample"]["kept"]:
        lines += [f"**{s['id']}**", "", *_quote(s["text"]), ""]
    lines += ["## Sample of dropped documents", ""]
    for s in r["sample"]["dropped"]:
        lines += [f"**{s['id']}** — {s['reason']}", "", *_quote(s["text"]), ""]
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["Sampler", "render_markdown", "truncate"]
