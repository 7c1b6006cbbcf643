"""Watermark quality cost and detection rate on a trained model: plain vs watermarked generations.

    .venv/bin/python -m benchmarks.watermark [--texts 100] [--tokens 200] [--steps 400] [--deltas 1 2 4]

The model is runs/demo/pretrain when it exists (`make demo`), else the `tiny` preset's shape (4 layers,
width 128, GQA) trained here for `--steps` AdamW steps on Shakespeare with a 2,048-token BPE tokenizer
(a minute or two of CPU). Prompts are `--texts` windows of 16 tokens of held-out text; each is continued
with `--tokens` tokens at temperature 1 (EOS ignored), once plain and once per watermark delta (gamma
0.25). Reported per setting: the perplexity of the generated tokens under the unwatermarked model
(conditioned on the prompt; the quality cost is its rise over plain sampling), and the share of texts
detected at z >= 4 (the command's verdict) and at p < 0.01, scored on the re-tokenized text as
`lmforge watermark detect` sees it. Results: benchmarks/results/watermark.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.watermark import Watermark
from lmforge.model.config import get_preset
from lmforge.model.source import load_model
from lmforge.model.transformer import Transformer, build_model
from lmforge.tokenizer import Tokenizer, train_tokenizer

OUT = Path(__file__).resolve().parent / "results" / "watermark.json"
DEMO = Path("runs/demo/pretrain")
KEY = b"benchmark-watermark-key"


def _texts() -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tokenizer_corpus import shakespeare_docs

    return [d["text"] for d in shakespeare_docs(files=4)]


def _train(tok: Tokenizer, stream: torch.Tensor, steps: int, seq: int = 128) -> Transformer:
    """A few hundred AdamW steps on random windows: enough for a low-entropy, Shakespeare-like model."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (16,))
        batch = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f}", file=sys.stderr)
    return model.eval()


def _perplexity(model: Transformer, prompts: list[list[int]], outs: list[list[int]]) -> float:
    """exp(mean NLL) of the generated tokens under `model`, each conditioned on its prompt."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for p, o in zip(prompts, outs, strict=True):
            ids = torch.tensor([p + o])
            logp = model(ids)[0, len(p) - 1 : -1].float().log_softmax(-1)
            nll -= logp.gather(-1, torch.tensor(o)[:, None]).sum().item()
            n += len(o)
    return math.exp(nll / n)


def run(texts: int, tokens: int, steps: int, deltas: list[float], gamma: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    if DEMO.is_dir():
        model, tok = load_model(DEMO)
        held = tok.encode(_texts()[-1])
        source = str(DEMO)
    else:
        docs = _texts()
        tok = train_tokenizer(docs, vocab_size=2048)
        ids = [t for d in docs for t in tok.encode(d)]
        cut = int(0.9 * len(ids))
        model = _train(tok, torch.tensor(ids[:cut]), steps)
        held, source = ids[cut:], f"tiny preset trained {steps} steps here"
    trained_s = time.perf_counter() - t0
    gap = (len(held) - 16) // texts
    prompts = [held[i * gap : i * gap + 16] for i in range(texts)]
    engine = Engine(model, tok, max_batch_size=texts)
    params = [
        SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=True) for i in range(texts)
    ]
    rows: list[dict[str, Any]] = []
    for delta in [0.0, *deltas]:
        hook = Watermark(KEY, gamma, delta) if delta else None
        t = time.perf_counter()
        outs = engine.generate(
            [GenerationRequest(p, sp, logits_hook=hook) for p, sp in zip(prompts, params, strict=True)]
        )
        gen_s = time.perf_counter() - t
        detector = Watermark(KEY, gamma)
        dets = [detector.detect(tok.encode(c.text)) for c in outs]
        rows.append(
            {
                "delta": delta,
                "perplexity": _perplexity(model, prompts, [c.token_ids for c in outs]),
                "detected_z4": sum(d.z >= 4 for d in dets) / texts,
                "detected_p01": sum(d.p_value < 0.01 for d in dets) / texts,
                "mean_z": sum(d.z for d in dets) / texts,
                "green_fraction": sum(d.green_fraction for d in dets) / texts,
                "scored_tokens": sum(d.scored for d in dets) / texts,
                "generate_s": gen_s,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return {
        "model": source,
        "gamma": gamma,
        "texts": texts,
        "tokens": tokens,
        "setup_s": trained_s,
        "rows": rows,
        "machine": platform.platform(),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--gamma", type=float, default=0.25)
    ap.add_argument("--deltas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args.texts, args.tokens, args.steps, args.deltas, args.gamma)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
