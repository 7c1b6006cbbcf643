"""What `lmforge generate` and `lmforge chat` share: turning prompts into ids and where a chat reply ends.

ids = encode_prompt(tok, "Hello", chat=True, add_bos=False)   # the guarded chat template around it
params = stop_at_turn_end(tok, params)                         # the reply ends at <|im_end|> (or EOS)
"""

from __future__ import annotations

from typing import Any

from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import TURN_ENDS


def turn_end_ids(tok: Any) -> list[int]:
    return sorted({tid for text, tid in tok.special_tokens.items() if text in TURN_ENDS} | {tok.eos_id})


def stop_at_turn_end(tok: Any, params: SamplingParams) -> SamplingParams:
    """`params` that also stop at the tokenizer's end-of-turn tokens."""
    return params.model_copy(update={"stop_token_ids": [*params.stop_token_ids, *turn_end_ids(tok)]})


def encode_prompt(tok: Any, text: str, chat: bool, add_bos: bool) -> list[int]:
    """A plain prompt as its ids; with `chat`, one user turn through the guarded chat template."""
    if chat:
        return list(tok.encode_chat([{"role": "user", "content": text}], True, add_bos=add_bos))
    return list(tok.encode(text, add_bos=add_bos))


__all__ = ["TURN_ENDS", "encode_prompt", "stop_at_turn_end", "turn_end_ids"]
