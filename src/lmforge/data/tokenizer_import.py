"""`lmforge tokenizer import`: a SentencePiece `.model` or a tiktoken rank file -> lmforge's tokenizer folder.

    lmforge tokenizer import input=spm.model output=runs/imported/tokenizer
    lmforge tokenizer import input=cl100k_base.tiktoken output=tok pattern=cl100k

The folder is the one `tokenizer train` writes (tokenizer.json, tokenizer_config.json with the chat
template, special_tokens_map.json, manifest), so `tokenize`, training, `chat` and `serve` use it as they
use our own. Ordinary text gets the original library's ids, id for id:

- SentencePiece (BPE or unigram, read from the model's protobuf): the same pieces and ids, the model's
  normaliser (its precompiled NFKC charsmap, extra-whitespace removal, the `▁` dummy prefix), byte
  fallback and unknown piece. BPE merges are rebuilt from the pieces' scores (the highest-scoring piece
  merges first, as SentencePiece does).
- tiktoken (`base64-token rank` lines): ranks become ids and merge priorities of a byte-level BPE that
  first keeps a whole pre-token found in the vocabulary (tiktoken's rule); `pattern` is the pre-tokenizer
  regex: `cl100k` (default), `o200k`, or a regex of your own (the `pat_str` of the encoding).

The special tokens of `special_tokens` (eos, bos, pad and the ChatML markers by default) are added after
the vocabulary, or reuse a piece the vocabulary already has (e.g. `special_tokens.eos='</s>'`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from rich.console import Console
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lmforge.config import (
    ConfigFsPath,
    EncryptionConfig,
    Section,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.manifest import write_manifest
from lmforge.errors import ConfigError, DataError
from lmforge.io import check_output, staged_output
from lmforge.tokenizer import CHATML_TEMPLATE, ChatTemplate, SpecialTokensConfig, Tokenizer

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
PATTERNS = {
    # tiktoken's cl100k_base pat_str (GPT-3.5/4)
    "cl100k": _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    # tiktoken's o200k_base pat_str (GPT-4o)
    "o200k": "|".join(
        [
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
            + _CONTRACTIONS
            + "?",
            r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
            + _CONTRACTIONS
            + "?",
            r"\p{N}{1,3}",
            r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
            r"\s*[\r\n]+",
            r"\s+(?!\S)",
            r"\s+",
        ]
    ),
}
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6
_SP_UNIGRAM, _SP_BPE = 1, 2


class TokenizerImportConfig(Section):
    input: ConfigFsPath = Field(
        description="a SentencePiece .model file or a tiktoken rank file (base64 token + rank)"
    )
    output: ConfigFsPath = Field(description="tokenizer directory to write (a Hugging Face tokenizer folder)")
    format: Literal["auto", "sentencepiece", "tiktoken"] = Field(
        "auto", description="auto = sentencepiece for a .model file, tiktoken otherwise"
    )
    pattern: str = Field(
        "cl100k", description="tiktoken pre-tokenizer: cl100k, o200k, or the encoding's own pat_str regex"
    )
    special_tokens: SpecialTokensConfig = Field(default_factory=SpecialTokensConfig)
    chat_template: ChatTemplate = Field(
        CHATML_TEMPLATE, description="Jinja chat template (transformers' dialect)"
    )
    model_max_length: int = Field(2048, ge=1, description="context length recorded for transformers")
    overwrite: bool = Field(False, description="replace an existing output directory")
    encryption: EncryptionConfig = encryption_field()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """`base64-token rank` lines -> {token bytes: rank}; DataError naming file:line otherwise."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise DataError(f"{path}:{n}: expected '<base64 token> <rank>' ({e})") from None
    if not ranks:
        raise DataError(f"{path}: no ranks; expected '<base64 token> <rank>' lines")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise DataError(
            f"{path}: byte tokens missing (e.g. {bytes([missing[0]])!r}); every byte needs a rank"
        )
    return ranks


def _merges(vocab: dict[str, int], pieces: list[str]) -> list[tuple[str, str]]:
    """Every split of each piece into two vocabulary pieces, in the pieces' priority order (`pieces`)."""
    out: list[tuple[str, str]] = []
    for piece in pieces:
        local = [
            (piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab
        ]
        out.extend(sorted(local, key=lambda lr: (vocab[lr[0]], vocab[lr[1]])))
    return out


def tiktoken_backend(ranks: dict[bytes, int], pattern: str) -> Any:
    table = bytes_to_unicode()
    vocab = {"".join(table[b] for b in token): rank for token, rank in ranks.items()}
    order = sorted(vocab, key=vocab.__getitem__)
    bpe = models.BPE(vocab=vocab, merges=_merges(vocab, order), ignore_merges=True)
    backend = Backend(bpe)
    regex = PATTERNS.get(pattern, pattern)
    try:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    except Exception as e:  # the Rust regex engine raises a bare Exception
        raise ConfigError(f"pattern: not a valid regex ({str(e)[:120]})") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _read_sp_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError as e:
        raise DataError(f"{path}: reading SentencePiece needs `pip install 'lmforge[sentencepiece]'`") from e
    proto: Any = spm_pb2.ModelProto()  # type: ignore[attr-defined]  # generated protobuf module
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise DataError(f"{path}: not a SentencePiece model ({str(e)[:80]})") from None
    if not proto.pieces:
        raise DataError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _sp_normalizer(norm: Any) -> Any:
    """SentencePiece's normaliser: the charsmap, then extra whitespace removed (as the library does)."""
    steps: list[Any] = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    return normalizers.Sequence(steps)


def sentencepiece_backend(path: Path) -> Any:
    """A tokenizers backend equal to the SentencePiece model at `path` (BPE or unigram)."""
    proto = _read_sp_proto(path)
    kind = proto.trainer_spec.model_type
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    unk = next((i for i, (_, _, t) in enumerate(pieces) if t == _SP_UNKNOWN), None)
    fallback = bool(proto.trainer_spec.byte_fallback)
    if kind == _SP_UNIGRAM:
        model: Any = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk, byte_fallback=fallback)
    elif kind == _SP_BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
        normal = [(p, s) for p, s, t in pieces if t in (_SP_NORMAL, _SP_USER)]
        order = [p for p, _ in sorted(normal, key=lambda ps: -ps[1])]
        model = models.BPE(
            vocab=vocab,
            merges=_merges(vocab, order),
            unk_token=pieces[unk][0] if unk is not None else None,
            fuse_unk=True,
            byte_fallback=fallback,
        )
    else:
        raise DataError(f"{path}: SentencePiece model type {kind} is not supported (BPE or unigram only)")
    backend = Backend(model)
    norm = proto.normalizer_spec
    backend.normalizer = _sp_normalizer(norm)
    prepend = "always" if norm.add_dummy_prefix else "never"
    split = bool(proto.trainer_spec.split_by_whitespace)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=split)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if unk is not None and proto.trainer_spec.unk_surface:  # what sentencepiece prints for <unk>: " ⁇ "
        steps.insert(1, decoders.Replace(pieces[unk][0], proto.trainer_spec.unk_surface))
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the dummy prefix's space
    backend.decoder = decoders.Sequence(steps)
    return backend


def import_tokenizer(cfg: TokenizerImportConfig) -> Tokenizer:
    """The imported tokenizer with lmforge's special tokens and chat template."""
    if not cfg.input.is_file():
        raise DataError(f"input: {cfg.input} is not a file (a SentencePiece .model or a tiktoken rank file)")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "sentencepiece" if cfg.input.suffix == ".model" else "tiktoken"
    if fmt == "sentencepiece":
        backend = sentencepiece_backend(cfg.input)
    else:
        backend = tiktoken_backend(read_tiktoken(cfg.input), cfg.pattern)
    special = cfg.special_tokens
    # An existing piece keeps its id; a new one is appended after the vocabulary.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.ordered()])
    return Tokenizer(
        backend,
        eos_token=special.eos,
        bos_token=special.bos,
        pad_token=special.pad,
        extra_special_tokens=special.extra,
        chat_template=cfg.chat_template,
        model_max_length=cfg.model_max_length,
    )


def run(cfg: TokenizerImportConfig) -> Tokenizer:
    check_output(cfg.output, cfg.overwrite)
    tok = import_tokenizer(cfg)
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        tok.save(stage)
        save_config(cfg, stage, "tokenizer import")
        write_manifest(stage, stage="tokenizer import")
    Console(stderr=True).print(
        f"tokenizer: imported {cfg.input} ({tok.vocab_size} tokens, special {tok.special_tokens}) -> {cfg.output}"
    )
    return tok


CONFIG = TokenizerImportConfig


def main(argv: list[str]) -> int:
    cfg = parse_command(
        argv,
        CONFIG,
        "tokenizer import",
        "Convert a SentencePiece .model (BPE or unigram) or a tiktoken rank file into a Hugging Face tokenizer "
        "folder with lmforge's special tokens and chat template; ordinary text keeps the original ids.",
        "lmforge tokenizer import input=spm.model output=runs/imported/tokenizer",
    )
    run(cfg)
    return 0


__all__ = [
    "CONFIG",
    "PATTERNS",
    "TokenizerImportConfig",
    "bytes_to_unicode",
    "import_tokenizer",
    "main",
    "read_tiktoken",
    "run",
    "sentencepiece_backend",
    "tiktoken_backend",
]
