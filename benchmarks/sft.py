"""Supervised fine-tuning throughput on this CPU: lmforge's SFT batches against `transformers`' collators.

    .venv/bin/python -m benchmarks.sft                 # uses configs/finetune/data/dialogue-train.jsonl

The question: what does a step over the same chat examples cost with each way of batching them, and do all
ways compute the same loss? Full fine-tuning of one Llama (4 layers, width 256, 4 heads, SwiGLU 688, vocab
4,096 from a BPE tokenizer trained here on the demo corpus, ~4.3M parameters) built by `transformers` from a
seed and saved once; lmforge loads the same folder with `load_hf`, so all start from identical weights.
The examples are the demo dialogue data tokenized once by `lmforge.data.chat` (ChatML, loss on assistant
replies only), so every contender gets the same token ids and labels; each step takes the next 32 examples.
AdamW (lr 1e-4, no decay), fp32, the same plain loop (forward, masked cross-entropy summed over targets /
targets, backward, step).

  lmforge_packed    lmforge's model on packed rows of 512 positions (positions reset per example,
                    block-diagonal mask): `collate(..., packed=True)`, what `lmforge finetune` trains on
  lmforge_padded    lmforge's model, one example per row, padded to the longest of the step
  hf_padded         `LlamaForCausalLM` (sdpa), one example per row padded to the longest, attention_mask
                    (what DataCollatorForSeq2Seq produces)
  hf_flattened      `LlamaForCausalLM` (sdpa) on `DataCollatorWithFlattening`'s single row with
                    position ids reset per example (transformers' padding-free packing)

All four run in one process, alternating step by step, so a shared machine's load falls on all alike;
target tokens/s = timed steps x supervised tokens / the seconds spent in that contender's steps.
The first step's loss of each contender is recorded: identical weights and examples must give the same
loss whatever the batching (checked to 1e-4 here). Output: a table and benchmarks/results/sft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "finetune" / "data" / "dialogue-train.jsonl"
SHAPE = {"vocab": 4096, "dim": 256, "layers": 4, "heads": 4, "hidden": 688, "seq": 512}
PER_STEP = 32  # examples per optimizer step, for every contender


def tokenizer() -> Any:
    from tests.tokenizer_corpus import shakespeare_docs

    from lmforge.tokenizer import train_tokenizer

    return train_tokenizer([d["text"] for d in shakespeare_docs(6)], vocab_size=SHAPE["vocab"])


def hf_model(folder: Path, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPE
    cfg = LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["dim"], intermediate_size=s["hidden"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
        max_position_embeddings=s["seq"], tie_word_embeddings=True, bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save(folder)
    model.config._attn_implementation = "sdpa"
    return model


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    n = int((labels != -100).sum())
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum") / n, n


def stepper(model: Any, make_batch: Callable[[list[Any]], dict[str, torch.Tensor]], hf: bool) -> Any:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step(examples: list[Any]) -> tuple[float, int]:
        b = make_batch(examples)
        if hf:
            kw = {k: v for k, v in b.items() if k in ("attention_mask", "position_ids")}
            # use_cache=False: with a cache (the config's default) transformers skips its packed-sequence
            # detection and the flattened examples attend to each other (the loss then differs).
            logits = model(input_ids=b["input_ids"], use_cache=False, **kw).logits
        else:
            logits = model(b["input_ids"], position_ids=b.get("position_ids"), attn_mask=b.get("attn_mask"))
        loss, n = loss_of(logits.float(), b["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), n

    return step


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="chat / prompt-completion / Alpaca JSONL")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender")
    p.add_argument("--steps", type=int, default=6, help="timed steps per contender")
    p.add_argument("--threads", type=int, default=1, help="1 beats 2 on a shared 2-core machine")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sft.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import DataCollatorWithFlattening

    from lmforge.data.chat import SFTDataConfig, collate, load_sft, pack
    from lmforge.model.hf import load_hf

    tok = tokenizer()
    data = load_sft(SFTDataConfig(train=[str(args.data)]), tok, seq_len=SHAPE["seq"])
    need = (args.warmup + args.steps) * PER_STEP
    if len(data.train) < need:
        raise SystemExit(f"{args.data}: {len(data.train)} examples, need {need}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_a = hf_model(Path(tmp), tok)
        hf_b = hf_model(Path(tmp), tok)
        ours_a, _ = load_hf(tmp)
        ours_b, _ = load_hf(tmp)

    def packed(ex: list[Any]) -> dict[str, torch.Tensor]:
        return collate([[ex[i] for i in row] for row in pack(ex, SHAPE["seq"])], tok.pad_id, packed=True)

    def padded(ex: list[Any]) -> dict[str, torch.Tensor]:
        return collate([[e] for e in ex], tok.pad_id, packed=False)

    def hf_padded(ex: list[Any]) -> dict[str, torch.Tensor]:
        b = padded(ex)
        b["attention_mask"] = torch.zeros_like(b["input_ids"])
        for i, e in enumerate(ex):
            b["attention_mask"][i, : len(e.ids) - 1] = 1
        return b

    flatten = DataCollatorWithFlattening(return_position_ids=True)

    def hf_flat(ex: list[Any]) -> dict[str, torch.Tensor]:
        # The collator shifts nothing: give it inputs ids[:-1] with labels ids[1:] (masked) per example.
        feats = [
            {
                "input_ids": e.ids[:-1],
                "labels": [t if m else -100 for t, m in zip(e.ids[1:], e.mask[1:], strict=True)],
            }
            for e in ex
        ]
        out = flatten(feats, return_tensors="pt")
        # It marks each example's first label -100 (it assumes unshifted labels); ours are already shifted.
        out["labels"] = torch.tensor([[x for f in feats for x in f["labels"]]])
        return {k: v for k, v in out.items() if k in ("input_ids", "labels", "position_ids")}

    contenders = {
        "lmforge_packed": stepper(ours_a.train(), packed, hf=False),
        "lmforge_padded": stepper(ours_b.train(), padded, hf=False),
        "hf_padded": stepper(hf_a.train(), hf_padded, hf=True),
        "hf_flattened": stepper(hf_b.train(), hf_flat, hf=True),
    }
    busy = dict.fromkeys(contenders, 0.0)
    first_loss: dict[str, float] = {}
    targets = 0
    padded_positions = {"packed": 0, "padded": 0}
    for s in range(args.warmup + args.steps):
        ex = data.train[s * PER_STEP : (s + 1) * PER_STEP]
        if s >= args.warmup:
            targets += sum(e.n_targets for e in ex)
            padded_positions["packed"] += int(packed(ex)["input_ids"].numel())
            padded_positions["padded"] += int(padded(ex)["input_ids"].numel())
        for name, step in contenders.items():
            t0 = time.perf_counter()
            loss, _ = step(ex)
            dt = time.perf_counter() - t0
            if s == 0:
                first_loss[name] = loss
            if s >= args.warmup:
                busy[name] += dt
        print(f"step {s}: " + "  ".join(f"{k} {busy[k]:.1f}s" for k in busy), flush=True)
    rates = {k: targets / v for k, v in busy.items()}
    spread = max(first_loss.values()) - min(first_loss.values())
    assert spread < 1e-4, f"the first-step losses differ by {spread}: {first_loss}"
    result = {
        "benchmark": "SFT full fine-tuning, supervised tokens/s, CPU fp32, contenders alternating step by step",
        "shape": SHAPE,
        "examples_per_step": PER_STEP,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "target_tokens_timed": targets,
        "positions_computed": padded_positions,
        "target_tokens_per_s": rates,
        "ratios": {
            "lmforge_packed_over_hf_flattened": rates["lmforge_packed"] / rates["hf_flattened"],
            "lmforge_packed_over_hf_padded": rates["lmforge_packed"] / rates["hf_padded"],
            "lmforge_packed_over_lmforge_padded": rates["lmforge_packed"] / rates["lmforge_padded"],
        },
        "first_step_loss": first_loss,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "command": "python -m benchmarks.sft " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| contender | supervised tokens/s | lmforge_packed / contender | first-step loss |\n|---|---|---|---|"
    )
    for k, v in rates.items():
        print(f"| {k} | {v:,.0f} | {rates['lmforge_packed'] / v:.2f}x | {first_loss[k]:.6f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
