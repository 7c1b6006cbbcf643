"""Byte-level BPE tokenizers: train on curated documents, save/load as a Hugging Face folder, chat template.

    lmforge tokenizer train -c configs/demo/tokenizer.yaml input=runs/demo/curated output=runs/demo/tokenizer

Byte-level BPE (GPT-2 style pre-tokenizer, no Unicode normaliser) encodes any string and decodes it back
exactly. The output folder loads with `transformers.AutoTokenizer.from_pretrained(dir)` and with
`lmforge.tokenizer.load_tokenizer(dir)`; both give the same ids and render the same chat template.

Training holds out a stable hash-selected share of documents (the same hash as `tokenize`'s validation
split) and reports bytes per token on them: the number that decides whether a vocabulary size pays off.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from lmforge.config import Section, parse_command, save_config
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json, atomic_write_text
from lmforge.model.integrity import verify_files

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
REPORT = "report.json"
# The files that make a tokenizer (what `tokenize` copies next to its shards).
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)

# ChatML: every message is `<|im_start|>role\ncontent<|im_end|>\n`; the generation prompt opens an
# assistant turn. Markers are single special tokens, so a role can never be forged by message text
# once the chat data pipeline encodes content separately.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class SpecialTokensConfig(Section):
    eos: str = Field("<|endoftext|>", description="end of text; also separates documents in token shards")
    bos: str = Field("<|bos|>", description="beginning of sequence (added only when asked: add_bos)")
    pad: str = Field("<|pad|>", description="padding for batched inference and fine-tuning")
    extra: list[str] = Field(
        default_factory=lambda: ["<|im_start|>", "<|im_end|>"],
        description="more special tokens, e.g. the chat role markers the chat template uses",
    )

    def ordered(self) -> list[str]:
        """eos, bos, pad, extra...: they get ids 0, 1, 2, ... in this order."""
        tokens = [self.eos, self.bos, self.pad, *self.extra]
        dupes = sorted({t for t in tokens if tokens.count(t) > 1})
        if dupes:
            raise ConfigError(f"special_tokens: {dupes} given more than once; each must be distinct")
        if any(not t for t in tokens):
            raise ConfigError("special_tokens: a special token is empty")
        return tokens


class TokenizerTrainConfig(Section):
    input: Path = Field(description="curated documents directory (output of `lmforge prepare`)")
    output: Path = Field(description="tokenizer directory to write (a Hugging Face tokenizer folder)")
    vocab_size: int = Field(
        8192,
        ge=300,
        le=1 << 20,
        description="tokens in the vocabulary, special tokens and 256 bytes included",
    )
    min_frequency: int = Field(2, ge=1, description="a pair must occur this often to be merged")
    special_tokens: SpecialTokensConfig = Field(default_factory=SpecialTokensConfig)
    chat_template: str = Field(CHATML_TEMPLATE, description="Jinja chat template (transformers' dialect)")
    model_max_length: int = Field(2048, ge=1, description="context length recorded for transformers")
    heldout_fraction: float = Field(
        0.02, ge=0.0, lt=1.0, description="share of documents held out of training to measure bytes/token"
    )
    seed: int = Field(0, description="salt of the stable document hash that picks held-out documents")
    max_train_bytes: int = Field(0, ge=0, description="train on at most this many UTF-8 bytes (0 = all)")
    overwrite: bool = Field(False, description="replace an existing output directory")
    verify_input: bool = Field(True, description="check the input's SHA-256 manifest first")

    @field_validator("chat_template")
    @classmethod
    def _template_compiles(cls, value: str) -> str:
        import jinja2

        try:
            _jinja_env().from_string(value)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not compile: {e.message} (line {e.lineno})") from e
        return value


CONFIG = TokenizerTrainConfig


def _jinja_env() -> Any:
    """The sandboxed Jinja environment transformers renders chat templates with (same options, globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what a model needs around it: special token ids and a chat template."""

    def __init__(
        self,
        backend: Any,
        *,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        extra_special_tokens: Sequence[str] = (),
        chat_template: str = CHATML_TEMPLATE,
        model_max_length: int = 2048,
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token = eos_token
        # Hugging Face tokenizers without BOS/PAD are common; EOS stands in for them (as in GPT-2).
        self.bos_token = bos_token or eos_token
        self.pad_token = pad_token or eos_token
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.special_tokens: dict[str, int] = {}
        for tok in dict.fromkeys([eos_token, self.bos_token, self.pad_token, *self.extra_special_tokens]):
            tid = backend.token_to_id(tok)
            if tid is None:
                raise DataError(f"special token {tok!r} is not in the tokenizer's vocabulary")
            self.special_tokens[tok] = tid
        self.eos_id = self.special_tokens[eos_token]
        self.bos_id = self.special_tokens[self.bos_token]
        self.pad_id = self.special_tokens[self.pad_token]
        self._template: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in `text` map to their ids, as in transformers."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """Encode many texts at once (parallel inside the Rust library unless TOKENIZERS_PARALLELISM=false)."""
        fast = getattr(self.backend, "encode_batch_fast", None)  # no offsets: faster, tokenizers >= 0.20
        encs = (fast or self.backend.encode_batch)(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if add_bos else e.ids for e in encs]

    def as_plain_text(self) -> Tokenizer:
        """A copy that encodes special-token strings found in text ('<|endoftext|>') as ordinary text.

        What `tokenize` uses on documents (like tiktoken's `encode_ordinary`): a document that quotes a
        special token cannot inject an EOS or a role marker into the training stream.
        """
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_str(self.backend.to_str())
        backend.encode_special_tokens = True
        return Tokenizer(
            backend,
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            pad_token=self.pad_token,
            extra_special_tokens=self.extra_special_tokens,
            chat_template=self.chat_template,
            model_max_length=self.model_max_length,
        )

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """Render `messages` exactly as `transformers`' `apply_chat_template(..., tokenize=False)` does."""
        if self._template is None:
            self._template = _jinja_env().from_string(self.chat_template)
        return str(
            self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        )

    def hf_config(self) -> dict[str, Any]:
        """tokenizer_config.json as `transformers.AutoTokenizer` reads it."""
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": None,
            "additional_special_tokens": self.extra_special_tokens,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
            # transformers' default clean-up rewrites " ." as "." on decode: wrong for byte-level BPE.
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        }

    def save(self, directory: Path | str) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (byte-identical per content)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_JSON, self.backend.to_str(pretty=True) + "\n")
        atomic_write_json(directory / TOKENIZER_CONFIG, self.hf_config())
        special_map = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": self.extra_special_tokens,
        }
        atomic_write_json(directory / SPECIAL_TOKENS_MAP, special_map)
        return directory

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a tokenizer folder (ours or a Hugging Face one with tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer as Backend

    directory = Path(path)
    tj, tc = directory / TOKENIZER_JSON, directory / TOKENIZER_CONFIG
    for f in (tj, tc):
        if not f.is_file():
            raise DataError(f"{f}: not found; is {directory} a tokenizer folder (`lmforge tokenizer train`)?")
    # Checked against the folder's (or its run's / tokens dir's) manifest before anything is parsed.
    verify_files(directory, [TOKENIZER_JSON, TOKENIZER_CONFIG, "chat_template.jinja"])
    try:
        backend = Backend.from_file(str(tj))
    except Exception as e:  # the Rust library raises a bare Exception on malformed files
        raise DataError(f"{tj}: not a valid tokenizers file ({e})") from e
    try:
        cfg = json.loads(tc.read_text("utf-8"))
    except ValueError as e:
        raise DataError(f"{tc}: not valid JSON ({e})") from e
    eos = _token_text(cfg.get("eos_token"))
    if eos is None:
        raise DataError(f"{tc}: key 'eos_token' missing; lmforge needs an end-of-text token")
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    template = cfg.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():  # transformers >= 4.50 layout
        template = (directory / "chat_template.jinja").read_text("utf-8")
    return Tokenizer(
        backend,
        eos_token=eos,
        bos_token=_token_text(cfg.get("bos_token")),
        pad_token=_token_text(cfg.get("pad_token")),
        extra_special_tokens=[t for t in (_token_text(x) for x in extra) if t],
        chat_template=template if isinstance(template, str) else CHATML_TEMPLATE,
        model_max_length=int(min(cfg.get("model_max_length") or 2048, 1 << 31)),
    )


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    special_tokens: SpecialTokensConfig | None = None,
    chat_template: str = CHATML_TEMPLATE,
    model_max_length: int = 2048,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on `texts`: special tokens get ids 0.., the 256 byte symbols next, merges after."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    special = special_tokens or SpecialTokensConfig()
    ordered = special.ordered()
    if vocab_size < len(ordered) + 256:
        raise ConfigError(f"vocab_size: {vocab_size} < {len(ordered)} special tokens + 256 byte tokens")
    backend = Backend(models.BPE())
    # No normaliser: NFC/NFKC would change text and break decode(encode(s)) == s.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=ordered,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(
        backend,
        eos_token=special.eos,
        bos_token=special.bos,
        pad_token=special.pad,
        extra_special_tokens=special.extra,
        chat_template=chat_template,
        model_max_length=model_max_length,
    )


def bytes_per_token(tok: Tokenizer, texts: Sequence[str], batch: int = 256) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of `texts`; their ratio is the compression the model sees."""
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    ntok = 0
    for i in range(0, len(texts), batch):
        ntok += sum(len(ids) for ids in tok.encode_batch(texts[i : i + batch]))
    return nbytes, ntok


class _Splitter:
    """Feeds training documents to the trainer and keeps held-out ones aside.

    The last training document is held back one step, so that when hashing picked no held-out document
    (tiny corpora) it becomes the held-out one instead: >= 2 documents always give a measurable report.
    """

    def __init__(self, docs: Iterable[dict[str, Any]], fraction: float, seed: int, max_bytes: int) -> None:
        self.docs, self.fraction, self.seed, self.max_bytes = docs, fraction, seed, max_bytes
        self.heldout: list[str] = []
        self.train_docs = self.train_bytes = self.total_docs = 0

    def __iter__(self) -> Iterator[str]:
        from lmforge.data.shards import doc_fraction

        pending: str | None = None
        for i, doc in enumerate(self.docs):
            self.total_docs += 1
            text = doc["text"]
            if doc_fraction(str(doc.get("id", i)), self.seed) < self.fraction:
                self.heldout.append(text)
                continue
            if self.max_bytes and self.train_bytes >= self.max_bytes:
                continue
            if pending is not None:
                yield pending
            pending = text
            self.train_docs += 1
            self.train_bytes += len(text.encode("utf-8"))
        if pending is not None:
            if not self.heldout and self.fraction > 0 and self.total_docs >= 2:
                self.heldout.append(pending)
                self.train_docs -= 1
                self.train_bytes -= len(pending.encode("utf-8"))
            else:
                yield pending


def run(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Train, measure, save; returns the report."""
    from rich.console import Console

    from lmforge.data.curated import curated_shards, iter_curated
    from lmforge.data.manifest import ensure_verified, write_manifest
    from lmforge.io import check_output, staged_output

    console = Console(stderr=True)
    check_output(cfg.output, cfg.overwrite)
    ensure_verified(cfg.input, skip=not cfg.verify_input)
    curated_shards(cfg.input)  # a clear DataError when the directory holds no documents
    splitter = _Splitter(iter_curated(cfg.input), cfg.heldout_fraction, cfg.seed, cfg.max_train_bytes)
    t0 = time.perf_counter()
    tok = train_tokenizer(
        splitter,
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens,
        chat_template=cfg.chat_template,
        model_max_length=cfg.model_max_length,
        show_progress=sys.stderr.isatty(),
    )
    train_seconds = time.perf_counter() - t0
    if splitter.train_docs == 0:
        raise DataError(
            f"{cfg.input}: no documents left to train on (heldout_fraction={cfg.heldout_fraction})"
        )
    hb, ht = bytes_per_token(tok, splitter.heldout)
    report = {
        "vocab_size": tok.vocab_size,
        "requested_vocab_size": cfg.vocab_size,
        "special_tokens": tok.special_tokens,
        "train_seconds": round(train_seconds, 3),
        "train_documents": splitter.train_docs,
        "train_bytes": splitter.train_bytes,
        "train_mb_per_s": round(splitter.train_bytes / 1e6 / max(train_seconds, 1e-9), 3),
        "heldout_documents": len(splitter.heldout),
        "heldout_bytes": hb,
        "heldout_tokens": ht,
        "bytes_per_token": round(hb / ht, 4) if ht else None,
        "utf8_bytes_per_token": 1.0,  # the baseline: a byte-level model without merges
    }
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        tok.save(stage)
        atomic_write_json(stage / REPORT, report)
        save_config(cfg, stage, "tokenizer train")
        write_manifest(stage, stage="tokenizer train")
    bpt = report["bytes_per_token"]
    console.print(
        f"tokenizer: {tok.vocab_size} tokens, trained on {splitter.train_docs:,} docs "
        f"({splitter.train_bytes / 1e6:.1f} MB) in {train_seconds:.1f} s; held-out {len(splitter.heldout):,} docs "
        f"({hb / 1e6:.2f} MB): {bpt if bpt is not None else 'n/a'} bytes/token (UTF-8 bytes: 1.0) -> {cfg.output}"
    )
    return report


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        CONFIG,
        "tokenizer train",
        "Train a byte-level BPE tokenizer on curated documents and save it as a Hugging Face tokenizer folder "
        "(tokenizer.json, tokenizer_config.json with the chat template), with a bytes-per-token report "
        "on held-out documents.",
        "lmforge tokenizer train -c configs/demo/tokenizer.yaml input=runs/demo/curated output=runs/demo/tokenizer",
    )
    run(cfg)
    return 0


__all__ = [
    "CHATML_TEMPLATE",
    "CONFIG",
    "TOKENIZER_FILES",
    "SpecialTokensConfig",
    "Tokenizer",
    "TokenizerTrainConfig",
    "bytes_per_token",
    "load_tokenizer",
    "main",
    "train_tokenizer",
]
