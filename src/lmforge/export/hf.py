"""Hugging Face folder export: weights + config (model/hf.py's key maps), tokenizer, chat template,
generation_config.json whose eos_token_id lists every end-of-turn token (so `generate` stops at <|im_end|>);
checked by loading it with `transformers` itself (no trust_remote_code).

    write_hf(model, tok, "out/hf")
    run = HfRunner("out/hf"); logits = run(ids)     # transformers.AutoModelForCausalLM, fp32
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.model.hf import hf_architecture, save_hf
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer


def check_supported(model: Transformer) -> str:
    return hf_architecture(model.cfg)  # ConfigError when no HF class represents the config


def write_hf(model: Transformer, tok: Tokenizer, folder: Path) -> None:
    """Fill `folder` (replaced atomically by save_hf) with an HF model folder and the tokenizer files."""
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tokenizer-") as tmp:
        tok.save(tmp)  # tokenizer.json, tokenizer_config.json (with chat_template), special_tokens_map.json
        save_hf(
            model,
            folder,
            tokenizer_dir=tmp,
            bos_token_id=tok.bos_id,
            eos_token_id=tok.end_of_turn_ids(),  # eos + <|im_end|>...: other runtimes stop at a turn's end
            overwrite=True,
        )


class HfRunner:
    """transformers' own model class on the exported folder; ids -> (T, vocab) logits."""

    def __init__(self, folder: Path | str) -> None:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32
        ).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        out = self.model(torch.tensor([list(ids)], dtype=torch.long))
        return out.logits[0].float().numpy()

    def checks(self, tok: Tokenizer, texts: Sequence[str]) -> dict[str, Any]:
        """Same ids for every text and the same rendered chat template as lmforge's tokenizer."""
        ids_ok = all(self.tokenizer.encode(t, add_special_tokens=False) == tok.encode(t) for t in texts)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[0]}]
        theirs = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ours = tok.apply_chat_template(msgs, add_generation_prompt=True)
        return {"tokenizer_match": ids_ok, "chat_template_match": theirs == ours}


__all__ = ["HfRunner", "check_supported", "write_hf"]
