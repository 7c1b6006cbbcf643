"""Poisoning scan: find documents and fine-tuning records that carry backdoor-like patterns.

    from lmforge.data.scan import ScanOptions, read_records, scan
    records = read_records(["configs/finetune/data/dialogue-train.jsonl"])
    result = scan(records, ScanOptions())      # result.findings: [Finding(detector, record, reason, example)]
    flagged = result.flagged()                 # record indices flagged by any detector

Records are documents (`{"text": ...}` JSONL, or any file `lmforge prepare` reads), SFT records (every
format of data/chat.py) or preference pairs (data/preference.py's keys). Detectors, each a small function:

- `hidden_unicode`: zero-width characters, bidi controls, Unicode tag characters, and homoglyph runs
  (one word mixing Latin with Cyrillic or Greek letters), which hide a trigger from a reviewer.
- `rare_ngrams`: a word n-gram (2-3 words) that recurs in `min_docs` or more documents whose words occur
  (almost) nowhere else in the corpus, in documents that are otherwise unrelated: an inserted token sequence.
- `trigger_response`: a prompt n-gram that is (nearly) always followed by the same response, across
  prompts that are otherwise different: trigger -> fixed payload in SFT or preference data.
- `swapped_pairs`: near-duplicate preference prompts (MinHash, data/dedup.py) whose chosen/rejected are
  swapped relative to the majority orientation of their cluster (a tie trusts the earliest pair).
- `perplexity`: per-record mean token loss under a reference model (model/source.py `load_model`), flagged
  when its robust z-score (median / MAD) exceeds `z` in either direction.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from lmforge.data.chat import detect_format, to_messages
from lmforge.data.dedup import DedupConfig, Deduper, exact_key, signature
from lmforge.data.ingest import IngestConfig, RawDoc, expand_inputs, iter_documents
from lmforge.data.pii import mask_pii
from lmforge.data.preference import KEYS as PREF_KEYS
from lmforge.errors import DataError
from lmforge.io import iter_jsonl
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

DetectorName = Literal["hidden_unicode", "rare_ngrams", "trigger_response", "swapped_pairs", "perplexity"]
DETECTORS: tuple[DetectorName, ...] = get_args(DetectorName)
_WORD = re.compile(r"\w+(?:['’]\w+)*")  # pr'ythee is one word, not 'pr' + 'ythee'
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad\u180e")
BIDI = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@dataclass
class Record:
    """One scanned item. `prompt`/`response` are set for SFT and preference records (response = chosen)."""

    source: str  # file:line
    kind: str  # document | sft | preference
    text: str  # everything a reader sees, for the Unicode, n-gram and perplexity detectors
    data: dict[str, Any]  # the record as read, written back by drop
    file: str
    prompt: str = ""
    response: str = ""
    rejected: str = ""


@dataclass(frozen=True)
class Finding:
    detector: str
    record: int  # index into the records
    reason: str
    example: str  # the evidence, hidden characters escaped, PII masked


@dataclass
class ScanOptions:
    detectors: tuple[str, ...] = DETECTORS
    rare_min_docs: int = 5
    rare_max_n: int = 3
    rare_outside: float = 0.25  # a word of the n-gram may occur in at most this share more documents
    rare_max_share: float = 0.05  # an n-gram in more than this share of documents is a template
    unrelated: float = 0.3  # documents sharing a pattern must have a mean word Jaccard below this
    trigger_min_support: int = 3
    trigger_max_n: int = 4
    trigger_coverage: float = 0.8  # share of one response's prompts that must contain the trigger
    trigger_purity: float = 0.8  # share of prompts containing the trigger that get that response
    swap_threshold: float = 0.6  # prompt Jaccard for near duplicates
    swap_margin: float = 0.2
    ppl_z: float = 4.0


@dataclass
class ScanResult:
    records: int
    findings: list[Finding] = field(default_factory=list)
    patterns: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # detector -> what recurred

    def flagged(self, detector: str | None = None) -> set[int]:
        return {f.record for f in self.findings if detector is None or f.detector == detector}


# -- reading -----------------------------------------------------------------------------------------
def _content(value: Any) -> str:
    """A preference field as text: a string, or the contents of a message list."""
    if isinstance(value, str):
        return value
    return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))


def record_from_json(rec: dict[str, Any], where: str, file: str, text_field: str = "text") -> Record:
    """Classify one JSON object: preference pair, SFT record (data/chat.py formats) or document."""
    if all(k in rec for k in PREF_KEYS):
        p, c, r = (_content(rec[k]) for k in PREF_KEYS)
        return Record(where, "preference", f"{p}\n{c}\n{r}", rec, file, prompt=p, response=c, rejected=r)
    if isinstance(rec.get(text_field), str) and "messages" not in rec:
        return Record(where, "document", rec[text_field], rec, file)
    messages = to_messages(rec, detect_format(rec, where), where)
    prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    response = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    text = "\n".join(m["content"] for m in messages)
    return Record(where, "sft", text, rec, file, prompt=prompt, response=response)


def read_records(inputs: list[str], text_field: str = "text") -> list[Record]:
    """Every record of the inputs (files, directories, globs); JSONL lines are classified one by one."""
    out: list[Record] = []
    cfg = IngestConfig(text_field=text_field)
    for f in expand_inputs(inputs):
        if f.path.name.endswith(".jsonl"):
            for line, rec in iter_jsonl(f.path):
                out.append(record_from_json(rec, f"{f.source}:{line}", f.source, text_field))
            continue
        for item in iter_documents([f], cfg):
            if isinstance(item, RawDoc):
                out.append(Record(item.id, "document", item.text, {text_field: item.text}, f.source))
    if not out:
        raise DataError(f"input: no records in {', '.join(inputs)}")
    return out


# -- shared helpers ----------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def escape_hidden(text: str) -> str:
    """Show invisible and format characters as \\uXXXX so a report reader sees them."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        hidden = (
            ch in ZERO_WIDTH or ch in BIDI or cat in ("Cf", "Co", "Cn") or (cat == "Cc" and ch not in "\n\t")
        )
        out.append(
            f"\\u{ord(ch):04x}" if hidden and ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}" if hidden else ch
        )
    return "".join(out)


def example(text: str, chars: int = 160) -> str:
    """Report text: PII masked (data/pii.py), hidden characters escaped, truncated."""
    masked, _ = mask_pii(text)
    shown = escape_hidden(masked)
    return shown if len(shown) <= chars else shown[:chars] + "..."


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def mean_similarity(sets: list[set[str]], limit: int = 40) -> float:
    """Mean pairwise Jaccard of (at most `limit` of) the sets: are these documents related?"""
    sets = sets[:limit]
    pairs = list(itertools.combinations(sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


def ngrams(ws: list[str], n: int) -> set[str]:
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


# -- detectors ---------------------------------------------------------------------------------------
def _script(ch: str) -> str:
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK"):
        if name.startswith(script):
            return script
    return ""


def hidden_unicode(text: str) -> str | None:
    """Why this text hides characters (counts by kind), or None."""
    if text.isascii():  # the common case, and nothing to hide in it
        return None
    zw = sum(ch in ZERO_WIDTH for ch in text)
    bidi = sum(ch in BIDI for ch in text)
    tags = sum(0xE0000 <= ord(ch) <= 0xE007F for ch in text)
    mixed = [
        w
        for w in _WORD.findall(text)
        if not w.isascii() and len({_script(c) for c in w if c.isalpha()} - {""}) > 1
    ]
    parts = [
        f"{n} {what}"
        for n, what in (
            (zw, "zero-width"),
            (bidi, "bidi control"),
            (tags, "tag character"),
            (len(mixed), "mixed-script word"),
        )
        if n
    ]
    if mixed:
        parts[-1] += f" ({escape_hidden(mixed[0])!s})"
    return ", ".join(parts) if parts else None


def detect_hidden_unicode(records: list[Record], opts: ScanOptions) -> list[Finding]:
    out = []
    for i, r in enumerate(records):
        reason = hidden_unicode(r.text)
        if reason:
            out.append(Finding("hidden_unicode", i, reason, example(r.text)))
    return out


def _runs(ws: list[str], keep: set[str]) -> list[list[str]]:
    """Maximal runs of consecutive words in `keep`, two words or longer."""
    out, cur = [], []
    for w in [*ws, ""]:
        if w in keep:
            cur.append(w)
            continue
        if len(cur) > 1:
            out.append(cur)
        cur = []
    return out


def detect_rare_ngrams(
    records: list[Record], opts: ScanOptions
) -> tuple[list[Finding], list[dict[str, Any]]]:
    """n-grams whose document frequency is far above what their rare words allow by chance: each word of
    the n-gram occurs (almost) only inside it, yet the n-gram recurs in `rare_min_docs` unrelated documents."""
    toks = [words(r.text) for r in records]
    word_sets = [set(t) for t in toks]
    word_df = Counter(w for s in word_sets for w in s)
    cap = max(opts.rare_min_docs, int(opts.rare_max_share * len(records)))
    rare = {w for w, d in word_df.items() if opts.rare_min_docs <= d <= cap}
    docs_of: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(toks):
        grams: set[str] = set()
        for run in _runs(t, rare):  # n-grams of rare words lie inside runs of rare words
            for n in range(2, min(opts.rare_max_n, len(run)) + 1):
                grams |= ngrams(run, n)
        for g in grams:
            docs_of[g].append(i)
    found: dict[tuple[int, ...], list[str]] = defaultdict(list)  # doc set -> phrases in all of them
    related: dict[tuple[int, ...], bool] = {}
    for g, docs in docs_of.items():
        parts = g.split()
        if len(docs) < opts.rare_min_docs or max(word_df[w] for w in parts) > len(docs) * (
            1 + opts.rare_outside
        ):
            continue
        key = tuple(docs)
        if key not in related:  # the phrase's own words left out, so it cannot make its documents alike
            related[key] = mean_similarity([word_sets[d] - set(parts) for d in docs]) >= opts.unrelated
        if not related[key]:
            found[key].append(g)
    out, patterns = [], []
    for members, candidates in sorted(found.items(), key=lambda kv: (-len(kv[0]), kv[1])):
        # sub-n-grams of a longer phrase share its documents: keep the longest phrases only
        phrases = sorted(g for g in candidates if not any(f" {g} " in f" {h} " for h in candidates if h != g))
        shown = ", ".join(repr(example(g)) for g in phrases)
        patterns += [{"ngram": example(g), "documents": len(members)} for g in phrases]
        for d in members:
            reason = f"rare n-gram(s) {shown} recur in {len(members)} unrelated documents"
            out.append(Finding("rare_ngrams", d, reason, example(records[d].text)))
    return out, patterns


def _trigger_in(prompts: list[list[str]], df: Counter[str], opts: ScanOptions) -> str | None:
    """The longest n-gram in >= coverage of these prompts that rarely occurs in other prompts."""
    size = len(prompts)
    counts: Counter[str] = Counter()
    for ws in prompts:
        counts.update({g for n in range(1, opts.trigger_max_n + 1) for g in ngrams(ws, n)})
    best = None
    for g, c in counts.items():
        frequent = c >= opts.trigger_coverage * size and c / df[g] >= opts.trigger_purity
        if frequent and (best is None or (len(g.split()), c) > (len(best.split()), counts[best])):
            best = g
    return best


def detect_trigger_response(
    records: list[Record], opts: ScanOptions
) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Group prompts by their (normalised) response; a group of different prompts that share a phrase seen
    almost nowhere else is a trigger -> fixed response pattern."""
    idx = [i for i, r in enumerate(records) if r.kind != "document" and r.response.strip()]
    pwords = {i: words(records[i].prompt) for i in idx}
    groups: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        groups[" ".join(words(records[i].response))].append(i)
    groups = {k: v for k, v in groups.items() if k and len(v) >= opts.trigger_min_support}
    df: Counter[str] = Counter()
    if groups:  # prompt n-gram document frequencies, needed only when some response repeats
        for ws in pwords.values():
            df.update({g for n in range(1, opts.trigger_max_n + 1) for g in ngrams(ws, n)})
    out, patterns = [], []
    for response, members in groups.items():
        prompts = [pwords[i] for i in members]
        trigger = _trigger_in(prompts, df, opts)
        if trigger is None:
            continue
        hit = [i for i in members if trigger in ngrams(pwords[i], len(trigger.split()))]
        if mean_similarity([set(pwords[i]) - set(trigger.split()) for i in hit]) >= opts.unrelated:
            continue  # near-duplicate prompts with one answer are duplicates, not a trigger
        patterns.append({"trigger": example(trigger), "response": example(response), "records": len(hit)})
        for i in hit:
            reason = f"prompt phrase {example(trigger)!r} -> the same response in {len(hit)} records"
            out.append(Finding("trigger_response", i, reason, example(records[i].prompt)))
    return out, patterns


def _orientation(a: Record, ref: Record, margin: float) -> int | None:
    """0: same chosen/rejected as `ref`, 1: swapped, None: the responses do not match either way. Word
    bigrams, so a reordered rejected (same words) still differs from its chosen."""

    def grams(t: str) -> set[str]:
        ws = words(t)
        return ngrams(ws, 2) | set(ws[:1])

    ac, ar, rc, rr = grams(a.response), grams(a.rejected), grams(ref.response), grams(ref.rejected)
    same = (jaccard(ac, rc) + jaccard(ar, rr)) / 2
    swapped = (jaccard(ac, rr) + jaccard(ar, rc)) / 2
    if same >= 0.5 and same >= swapped + margin:
        return 0
    if swapped >= 0.5 and swapped >= same + margin:
        return 1
    return None


def detect_swapped_pairs(
    records: list[Record], opts: ScanOptions
) -> tuple[list[Finding], list[dict[str, Any]]]:
    """Near-duplicate preference prompts (MinHash LSH on words) whose chosen/rejected disagree with the
    majority orientation of their cluster; on a tie the earliest pair is trusted (as dedup keeps it)."""
    idx = [i for i, r in enumerate(records) if r.kind == "preference"]
    cfg = DedupConfig(threshold=opts.swap_threshold, ngram=1, num_perm=128)
    dd = Deduper(cfg)
    for j, i in enumerate(idx):
        dd.add(j, exact_key(records[i].prompt), signature(records[i].prompt, cfg))
    out, patterns = [], []
    for cluster in dd.run().clusters:
        members = [idx[j] for j in cluster]
        ref = records[members[0]]
        side = {m: _orientation(records[m], ref, opts.swap_margin) for m in members[1:]}
        side[members[0]] = 0
        ones = sum(v == 1 for v in side.values())
        majority = 1 if ones > sum(v == 0 for v in side.values()) else 0
        odd = sorted(m for m, v in side.items() if v is not None and v != majority)
        if not odd:
            continue
        patterns.append({"cluster": len(members), "swapped": len(odd), "prompt": example(ref.prompt)})
        for m in odd:
            reason = f"chosen/rejected swapped against {len(members) - len(odd)} near-duplicate prompt(s)"
            out.append(Finding("swapped_pairs", m, reason, example(records[m].prompt)))
    return out, patterns


# -- perplexity under a reference model --------------------------------------------------------------
@torch.no_grad()
def mean_losses(texts: list[str], model: Transformer, tok: Tokenizer, max_tokens: int = 256) -> list[float]:
    """Mean next-token loss (nats) of each text's first `max_tokens` tokens; NaN for a one-token text."""
    device = next(model.parameters()).device
    plain = tok.as_plain_text()  # record text is text: a special-token string in it is not a marker
    max_tokens = min(max_tokens, model.cfg.max_seq_len)
    out = []
    for text in texts:
        ids = plain.encode(text)[:max_tokens]
        if len(ids) < 2:
            out.append(math.nan)
            continue
        x = torch.tensor([ids], device=device)
        logits = model(x).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
        out.append(float(loss))
    return out


def robust_z(values: list[float]) -> list[float]:
    """(x - median) / (1.4826 MAD): a z-score that the outliers themselves cannot inflate; NaN stays NaN."""
    finite = [v for v in values if not math.isnan(v)]
    if len(finite) < 3:
        return [0.0 if not math.isnan(v) else math.nan for v in values]
    med = statistics.median(finite)
    mad = statistics.median(abs(v - med) for v in finite) * 1.4826 or 1e-9
    return [(v - med) / mad for v in values]


def detect_perplexity(records: list[Record], losses: list[float], opts: ScanOptions) -> list[Finding]:
    out = []
    for i, (loss, z) in enumerate(zip(losses, robust_z(losses), strict=True)):
        if not math.isnan(z) and abs(z) > opts.ppl_z:
            side = "high" if z > 0 else "low"
            reason = f"{side} perplexity {math.exp(loss):.1f} (robust z {z:+.1f})"
            out.append(Finding("perplexity", i, reason, example(records[i].text)))
    return out


# -- the scan ----------------------------------------------------------------------------------------
DetectorFn = Callable[[list[Record], ScanOptions], tuple[list[Finding], list[dict[str, Any]]]]
_WITH_PATTERNS: dict[str, DetectorFn] = {
    "rare_ngrams": detect_rare_ngrams,
    "trigger_response": detect_trigger_response,
    "swapped_pairs": detect_swapped_pairs,
}


def scan(records: list[Record], opts: ScanOptions, losses: Iterable[float] | None = None) -> ScanResult:
    """Run the enabled detectors; `losses` (one per record, from `mean_losses`) enables `perplexity`."""
    res = ScanResult(records=len(records))
    if "hidden_unicode" in opts.detectors:
        res.findings += detect_hidden_unicode(records, opts)
    for name, fn in _WITH_PATTERNS.items():
        if name in opts.detectors:
            found, patterns = fn(records, opts)
            res.findings += found
            res.patterns[name] = patterns
    if "perplexity" in opts.detectors and losses is not None:
        res.findings += detect_perplexity(records, list(losses), opts)
    return res
