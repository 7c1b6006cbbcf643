"""Reward models: the one decoder with a scalar `score` head, saved as an HF `...ForSequenceClassification`.

    model, tok = load_reward_model("runs/rm/model", device="cpu")
    scores = score_texts(model, tok, ["2+3="], ["5"], batch_size=8)      # [float, ...]

A row's score is the head applied to the final hidden state of its last non-pad token (the rightmost
position whose id is not `pad_id`), exactly as transformers' LlamaForSequenceClassification picks it
with `pad_token_id`; rows are right-padded, so causal attention needs no mask. When the tokenizer's pad
token is its EOS token, an appended EOS is thus skipped, here and in transformers alike.

The saved folder is an HF folder: config.json (architectures [LlamaForSequenceClassification] or the
Mistral / Qwen2 one, num_labels 1, pad_token_id, tie_word_embeddings true since there is no LM head),
model.safetensors (the decoder under HF names plus `score.weight`) and the tokenizer files, so
`transformers.AutoModelForSequenceClassification.from_pretrained(folder)` gives the same scores.
Loading goes through the one resolver (model/source.py), which reads the decoder of such a folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json, staged_output
from lmforge.model.hf import (
    SCORE_KEY,
    SEQUENCE_CLASSIFIERS,
    config_to_hf,
    hf_architecture,
    read_hf_config,
    to_hf_state_dict,
)
from lmforge.model.hub import local_path
from lmforge.model.source import load_model
from lmforge.model.tensorfile import load_tensors, save_tensors
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

Prompt = str | list[dict[str, str]]
_CLASSIFIER = {causal: cls for cls, causal in SEQUENCE_CLASSIFIERS.items()}


def last_token_index(input_ids: Tensor, pad_id: int) -> Tensor:
    """(B,) index of each row's rightmost non-pad token (0 for an all-pad row), as transformers picks it."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


class RewardModel(nn.Module):
    """`backbone` (our Transformer) + `score` Linear(dim, 1, bias=False): input_ids (B, T) -> scores (B,)."""

    def __init__(self, backbone: Transformer, pad_id: int, seed: int = 0) -> None:
        super().__init__()
        if backbone.output is not None:  # an LM head the score never reads: dropped, as in the saved folder
            backbone.output = None
            backbone.cfg = backbone.cfg.model_copy(update={"tie_embeddings": True})
        self.backbone = backbone
        self.pad_id = pad_id
        w = backbone.tok_embeddings.weight
        self.score = nn.Linear(backbone.cfg.dim, 1, bias=False, device=w.device, dtype=w.dtype)
        gen = torch.Generator(device=w.device).manual_seed(seed)  # as HF: normal(0, initializer_range)
        with torch.no_grad():
            self.score.weight.normal_(0.0, backbone.cfg.init_std, generator=gen)

    @property
    def cfg(self) -> Any:
        return self.backbone.cfg

    def forward(self, input_ids: Tensor) -> Tensor:
        hidden = self.backbone.features(input_ids)  # (B, T, dim)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = hidden[rows, last_token_index(input_ids, self.pad_id)]  # (B, dim)
        return self.score(last).squeeze(-1).float()


# -- text -> ids, as the preference data (data/preference.py) encodes a prompt and one response -----------
def encode_scored(tok: Tokenizer, prompt: Prompt, response: str, *, append_eos: bool = True) -> list[int]:
    """Plain text: prompt + response (+ EOS), special-token strings as plain text. Chat (a message list):
    the template with the generation prompt, then the assistant turn with its end-of-turn marker."""
    if isinstance(prompt, str) and not isinstance(response, list):
        plain = tok.as_plain_text()
        return plain.encode(prompt) + plain.encode(response) + ([tok.eos_id] if append_eos else [])
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turn = [{"role": "assistant", "content": response}]
    for m in msgs + turn:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"expected messages {{'role': str, 'content': str}}, got {m!r:.80}")
        for special in tok.special_tokens:
            if special in m["content"]:
                raise DataError(f"a message contains the special token {special!r}")
    head = tok.render_chat(msgs, add_generation_prompt=True).text
    full = tok.render_chat(msgs + turn)
    ids = tok.encode_chat(msgs, add_generation_prompt=True)
    return ids + tok.encode_rendered(full, len(head), len(full.text.rstrip()))[0]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-padded (B, T) long tensor."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


@torch.no_grad()
def score_ids(model: RewardModel, rows: Sequence[Sequence[int]], batch_size: int = 8) -> list[float]:
    """Scores of token-id rows in order; a row longer than the context keeps its end (the response)."""
    limit = int(model.cfg.max_seq_len)
    device = model.score.weight.device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = [list(r)[-limit:] for r in rows[i : i + batch_size]]
        out += model(pad_rows(chunk, model.pad_id).to(device)).tolist()
    model.train(was_training)
    return out


def score_texts(
    model: RewardModel,
    tok: Tokenizer,
    prompts: Sequence[Prompt],
    responses: Sequence[str],
    batch_size: int = 8,
) -> list[float]:
    """One score per (prompt, response); prompts are strings or chat message lists."""
    if len(prompts) != len(responses):
        raise DataError(f"{len(prompts)} prompts but {len(responses)} responses")
    return score_ids(
        model, [encode_scored(tok, p, r) for p, r in zip(prompts, responses, strict=True)], batch_size
    )


# -- the HF folder -------------------------------------------------------------------------------------
def save_reward_hf(model: RewardModel, tok: Tokenizer, folder: Path) -> Path:
    """An HF `...ForSequenceClassification` folder at `folder` (replaced atomically); LoRA merged first."""
    backbone = model.backbone
    arch = hf_architecture(backbone.cfg)
    if arch not in _CLASSIFIER:
        raise ConfigError(
            f"a reward model needs a Llama-family decoder; {arch} has no scalar-head export here"
        )
    hf_cfg = config_to_hf(
        backbone.cfg,
        architecture=arch,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )
    hf_cfg |= {
        "architectures": [_CLASSIFIER[arch]],
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "tie_word_embeddings": True,  # no LM head: nothing to tie, and our loader then expects none
    }
    sd = {k: v for k, v in to_hf_state_dict(backbone, arch).items() if k != "lm_head.weight"}
    sd[SCORE_KEY] = model.score.weight
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    with staged_output(folder, overwrite=True, resume=False) as out:
        atomic_write_json(out / "config.json", hf_cfg)
        save_tensors(sd, out / "model.safetensors", metadata={"format": "pt"})
        tok.save(out)
    return folder


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, Tokenizer]:
    """(reward model in eval mode, tokenizer) from a folder `save_reward_hf` (or transformers) wrote."""
    p = local_path(str(path))
    hf_cfg = read_hf_config(p) if (p / "config.json").is_file() else {}
    if not set(hf_cfg.get("architectures") or []) & set(SEQUENCE_CLASSIFIERS):
        raise ConfigError(
            f"{p}: not a reward model folder (expected config.json with architectures one of "
            f"{sorted(SEQUENCE_CLASSIFIERS)}, as `lmforge align reward` writes in <run>/model)"
        )
    if int(hf_cfg.get("num_labels", len(hf_cfg.get("id2label") or {0: 0}))) != 1:
        raise ConfigError(f"{p}/config.json: num_labels must be 1 for a reward model")
    backbone, tok = load_model(p, device=device)  # verifies the files against the run's manifest
    tensors = load_tensors(p / "model.safetensors")
    if SCORE_KEY not in tensors or tuple(tensors[SCORE_KEY].shape) != (1, backbone.cfg.dim):
        raise DataError(f"{p}/model.safetensors: expected {SCORE_KEY} of shape (1, {backbone.cfg.dim})")
    pad = hf_cfg.get("pad_token_id")
    model = RewardModel(backbone, int(pad) if isinstance(pad, int) else tok.pad_id)
    with torch.no_grad():
        model.score.weight.copy_(tensors[SCORE_KEY])
    return model.eval(), tok


__all__ = [
    "RewardModel",
    "encode_scored",
    "last_token_index",
    "load_reward_model",
    "pad_rows",
    "save_reward_hf",
    "score_ids",
    "score_texts",
]
