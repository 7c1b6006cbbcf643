"""Byte-level BPE tokenizers: train, save/load as a Hugging Face folder, chat template, guarded chat encoding.

    tok = load_tokenizer("runs/demo/tokenizer")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Byte-level BPE (GPT-2 style pre-tokenizer, no Unicode normaliser) encodes any string and decodes it back
exactly. The output folder loads with `transformers.AutoTokenizer.from_pretrained(dir)` and with
`lmforge.tokenizer.load_tokenizer(dir)`; both give the same ids and render the same chat template.

`encode_chat` is the one way lmforge turns a conversation into ids (serve, chat, generate, the SFT and
DPO data): special tokens come only from the template's own markers, never from message text, so a
user typing `<|im_end|><|im_start|>system` gets ordinary text tokens. The command that trains a
tokenizer on curated documents is `lmforge.data.tokenizer_train`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import AfterValidator, Field
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge import crypt
from lmforge.config import Section
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json
from lmforge.model.integrity import verify_files

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# The files that make a tokenizer (what `tokenize` copies next to its shards).
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)

# Special tokens that end an assistant turn in common templates (ChatML, Llama 3, Phi, Gemma, Llama 2): where
# `lmforge generate` / `chat` stop, and what exports list as end of sequence so that other runtimes stop there.
TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")

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


def _jinja_env() -> Any:
    """The sandboxed Jinja environment transformers renders chat templates with (same options, globals)."""

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


def check_chat_template(template: str) -> None:
    """ValueError (with the line) when a Jinja chat template does not compile."""
    try:
        _jinja_env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e.message} (line {e.lineno})") from e


def _compiled(template: str) -> str:
    check_chat_template(template)
    return template


# A config field holding a Jinja chat template, checked to compile when the config is read.
ChatTemplate = Annotated[str, AfterValidator(_compiled)]


@dataclass(frozen=True)
class RenderedChat:
    """A chat template's output and the character span of each message's content in it.

    `content_spans` is None when the template rewrites contents (they cannot be located); the contents
    were then rendered with their special-token strings removed.
    """

    text: str
    content_spans: tuple[tuple[int, int], ...] | None


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
        self._plain_backend: Any = None  # the same vocabulary with special-token parsing off
        # Every special added token (HF tokenizers reserve more than they list), as message text must not make one.
        added = backend.get_added_tokens_decoder()
        self._special_ids = {int(i) for i, t in added.items() if t.special} | set(
            self.special_tokens.values()
        )

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def end_of_turn_ids(self) -> list[int]:
        """eos first, then every other special token that ends a turn (TURN_ENDS), e.g. [<|endoftext|>,
        <|im_end|>]: an export's end-of-sequence list, so that transformers, vLLM or llama.cpp stop at a turn's end."""
        ends = {tid for text, tid in self.special_tokens.items() if text in TURN_ENDS} - {self.eos_id}
        return [self.eos_id, *sorted(ends)]

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
        return Tokenizer(
            self._plain(),
            eos_token=self.eos_token,
            bos_token=self.bos_token,
            pad_token=self.pad_token,
            extra_special_tokens=self.extra_special_tokens,
            chat_template=self.chat_template,
            model_max_length=self.model_max_length,
        )

    def _plain(self) -> Any:
        if self._plain_backend is None:
            self._plain_backend = Backend.from_str(self.backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend

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

    def strip_special_tokens(self, text: str) -> str:
        """`text` without special-token strings, until stable: "<|im_<|im_end|>end|>" rebuilds one."""
        while any(s in text for s in self.special_tokens):
            for special in self.special_tokens:
                text = text.replace(special, "")
        return text

    def render_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> RenderedChat:
        """The template applied to `messages`, with where each message's content landed.

        The template is rendered once around unique placeholders to find the contents; if putting the
        contents back does not give the real rendering (a template that trims or edits contents), the
        spans are unknown and the contents are rendered with special-token strings removed instead.
        """
        real = self.apply_chat_template(messages, add_generation_prompt)
        marks = [f"\x00{uuid.uuid4().hex}\x00" for _ in messages]
        shell = self.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)], add_generation_prompt
        )
        if all(shell.count(mark) == 1 for mark in marks):
            parts: list[str] = []
            spans: list[tuple[int, int]] = [(0, 0)] * len(messages)
            pos = size = 0
            for at, i in sorted((shell.index(mark), i) for i, mark in enumerate(marks)):
                content = messages[i]["content"]
                parts += [shell[pos:at], content]
                size += at - pos
                spans[i] = (size, size + len(content))
                size += len(content)
                pos = at + len(marks[i])
            if "".join(parts) + shell[pos:] == real:
                return RenderedChat(real, tuple(spans))
        clean = [{**m, "content": self.strip_special_tokens(m["content"])} for m in messages]
        return RenderedChat(self.apply_chat_template(clean, add_generation_prompt), None)

    def encode_rendered(
        self, chat: RenderedChat, start: int = 0, end: int | None = None
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character offsets into the piece) of `chat.text[start:end]`, specials only from the template.

        The piece is encoded whole, as transformers would; only if a special token in that encoding
        overlaps a message's content is it re-encoded in pieces, the contents as plain text. So ordinary
        conversations get exactly the ids of the rendered string.
        """
        end = len(chat.text) if end is None else end
        text = chat.text[start:end]
        spans = [
            (max(a - start, 0), min(b, end) - start)
            for a, b in chat.content_spans or ()
            if a < end and b > start
        ]
        enc = self.backend.encode(text, add_special_tokens=False)
        forged = any(
            tid in self._special_ids and s < b and e > a
            for tid, (s, e) in zip(enc.ids, enc.offsets, strict=True)
            for a, b in spans
        )
        if not forged:
            return list(enc.ids), [(int(s), int(e)) for s, e in enc.offsets]
        return self._encode_pieces(text, spans)

    def _encode_pieces(
        self, text: str, spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Template text with special tokens live, each content span as plain text; offsets into `text`."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for a, b in [*sorted(spans), (len(text), len(text))]:
            for backend, lo, hi in ((self.backend, pos, a), (self._plain(), a, b)):
                if hi > lo:
                    enc = backend.encode(text[lo:hi], add_special_tokens=False)
                    ids += enc.ids
                    offsets += [(lo + s, lo + e) for s, e in enc.offsets]
            pos = max(pos, b)
        return ids, offsets

    def encode_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False, add_bos: bool = False
    ) -> list[int]:
        """Token ids of the rendered conversation; message text can never become a special token."""
        ids, _ = self.encode_rendered(self.render_chat(messages, add_generation_prompt))
        return [self.bos_id, *ids] if add_bos else ids

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
        # The vocabulary and merges reflect the training text: sealed when encrypting (lmforge.crypt).
        crypt.write_text(directory / TOKENIZER_JSON, self.backend.to_str(pretty=True) + "\n")
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
    directory = Path(path)
    tj, tc = directory / TOKENIZER_JSON, directory / TOKENIZER_CONFIG
    for f in (tj, tc):
        if not f.is_file():
            raise DataError(f"{f}: not found; is {directory} a tokenizer folder (`lmforge tokenizer train`)?")
    # Checked against the folder's (or its run's / tokens dir's) manifest before anything is parsed.
    verify_files(directory, [TOKENIZER_JSON, TOKENIZER_CONFIG, "chat_template.jinja"])
    sealed = crypt.read_text(tj) if crypt.is_encrypted(tj) else None  # IntegrityError, not DataError
    try:
        backend = Backend.from_str(sealed) if sealed is not None else Backend.from_file(str(tj))
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


__all__ = [
    "CHATML_TEMPLATE",
    "TOKENIZER_FILES",
    "RenderedChat",
    "SpecialTokensConfig",
    "Tokenizer",
    "bytes_per_token",
    "check_chat_template",
    "load_tokenizer",
    "train_tokenizer",
]
