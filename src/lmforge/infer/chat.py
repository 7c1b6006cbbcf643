"""`lmforge chat`: a terminal chat with a model, through its tokenizer's chat template, streamed.

    lmforge chat model=runs/demo/sft system="You are a helpful assistant." sampling.temperature=0.7

Type a message and press Enter. Commands: `/reset` forgets the conversation, `/system TEXT` sets the
system prompt (and resets), `/exit` (or Ctrl-D) quits. When the conversation outgrows the model's context,
the oldest turns are dropped (the system prompt is kept). Reads stdin, so it also works piped:
`printf 'Hello\\n' | lmforge chat model=...`.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, TextIO

import torch
from pydantic import Field

from lmforge.config import ConfigRef, EncryptionConfig, Section, encryption_field, parse_command
from lmforge.device import pick_device
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.prompting import stop_at_turn_end
from lmforge.infer.sampling import SamplingParams
from lmforge.model.source import load_model

COMMAND = "chat"


def _default_sampling() -> SamplingParams:
    return SamplingParams(max_tokens=512, temperature=0.7, top_p=0.95)


class ChatConfig(Section):
    model: ConfigRef = Field(
        ..., description="HF folder, hub id ORG/NAME[@REV], lmforge run / model folder, or checkpoint"
    )
    system: str | None = Field(None, description="system prompt (null = none)")
    sampling: SamplingParams = Field(default_factory=_default_sampling, description="sampling of each reply")
    max_seq_len: int | None = Field(None, ge=1, description="context length (null = the model's)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="where to run: auto = cuda when present, else cpu; mps = Apple Silicon"
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null = torch default)")
    encryption: EncryptionConfig = encryption_field()


CONFIG = ChatConfig
DESCRIPTION = "Chat with a model in the terminal; replies stream token by token through the chat template."
EXAMPLE = 'lmforge chat model=runs/demo/sft system="You are terse."'


class ChatSession:
    """The conversation state and one reply at a time; separate from the terminal for testing."""

    def __init__(self, engine: Any, tok: Any, system: str | None, params: SamplingParams) -> None:
        self.engine, self.tok, self.system = engine, tok, system
        self.params = stop_at_turn_end(tok, params)
        self.messages: list[dict[str, str]] = []

    def reset(self, system: str | None = None) -> None:
        self.messages = []
        if system is not None:
            self.system = system

    def prompt_ids(self) -> list[int]:
        """The guarded chat encoding of the conversation, oldest turns dropped until a reply fits."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        budget = self.engine.max_seq_len - min(self.params.max_tokens, self.engine.max_seq_len // 2)
        msgs = list(self.messages)
        while True:
            ids: list[int] = self.tok.encode_chat(head + msgs, add_generation_prompt=True)
            if len(ids) <= budget or len(msgs) <= 1:
                return ids[-budget:]
            msgs = msgs[2:] if len(msgs) > 2 else msgs[1:]  # drop the oldest user + assistant pair

    def reply(self, user: str, out: TextIO) -> str:
        self.messages.append({"role": "user", "content": user})
        parts = []
        for ev in self.engine.stream(GenerationRequest(self.prompt_ids(), self.params)):
            out.write(ev.text)
            out.flush()
            parts.append(ev.text)
        out.write("\n")
        text = "".join(parts)
        self.messages.append({"role": "assistant", "content": text})
        return text


def loop(session: ChatSession, inp: TextIO, out: TextIO) -> int:
    interactive = inp.isatty()
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if line.startswith("/system "):
            session.reset(line[len("/system ") :])
            out.write("(system prompt set, conversation reset)\n")
            continue
        session.reply(line, out)


def main(argv: list[str]) -> int:

    cfg = parse_command(argv, CONFIG, COMMAND, DESCRIPTION, EXAMPLE)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, device=pick_device(cfg.device))
    engine = Engine(model, tok, max_batch_size=1, max_seq_len=cfg.max_seq_len)
    session = ChatSession(engine, tok, cfg.system, cfg.sampling)
    if sys.stdin.isatty():
        print("lmforge chat: /reset, /system TEXT, /exit", file=sys.stderr)
    return loop(session, sys.stdin, sys.stdout)


__all__ = ["CONFIG", "ChatConfig", "ChatSession", "loop", "main"]
