"""Memory planning accuracy: lmforge plan vs accelerate's `estimate-memory`, against a measured peak.

    .venv/bin/python -m benchmarks.plan

For each configuration (one CPU process unless noted; fp32; AdamW) the peak of live tensor bytes over one
training step after a warm-up step is measured with lmforge's probe (a fresh process, the shared training
loop, `MemoryTracker`: the CPU counterpart of torch.cuda.max_memory_allocated). The same number is then
predicted by `lmforge plan`'s memory model and by accelerate's estimator (`accelerate estimate-memory`,
`estimate_training_usage`: the peak of weights, gradients and Adam states for batch size 1, 4 x the fp32
model size; it has no activation or sharding term, so it is given the unsharded model). The score is
predicted / measured. Results: benchmarks/results/plan.json.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from accelerate.commands.estimate import estimate_training_usage

from lmforge.model.config import get_preset, num_params
from lmforge.plan.memory import Setup, memory
from lmforge.plan.probe import probe

OUT = Path(__file__).resolve().parent / "results" / "plan.json"

CASES = {
    "small pretrain, micro 4 x 256": Setup(get_preset("small"), micro_batch=4, seq_len=256, device="cpu"),
    "small pretrain + checkpointing": Setup(
        get_preset("small"), micro_batch=4, seq_len=256, checkpointing=True, device="cpu"
    ),
    "small LoRA r16": Setup(get_preset("small"), method="lora", micro_batch=4, seq_len=256, device="cpu"),
    "small QLoRA r16": Setup(get_preset("small"), method="qlora", micro_batch=4, seq_len=256, device="cpu"),
    "small FSDP, 2 processes": Setup(
        get_preset("small"), micro_batch=4, seq_len=256, world=2, shard=3, device="cpu"
    ),
}


def accelerate_estimate(s: Setup) -> float:
    usage = estimate_training_usage(num_params(s.cfg) * 4, "float32")
    return float(max(usage.values()))


def main() -> None:
    rows = []
    for name, s in CASES.items():
        t0 = time.perf_counter()
        measured = probe(s, steps=1, warmup=1)["peak_bytes"]
        ours, theirs = memory(s).peak, accelerate_estimate(s)
        rows.append(
            {
                "case": name,
                "measured_mb": measured / 1e6,
                "lmforge_mb": ours / 1e6,
                "accelerate_mb": theirs / 1e6,
                "lmforge_ratio": ours / measured,
                "accelerate_ratio": theirs / measured,
                "probe_s": time.perf_counter() - t0,
            }
        )
        r = rows[-1]
        print(
            f"{name:32s} measured {r['measured_mb']:8.1f} MB | lmforge {r['lmforge_mb']:8.1f} "
            f"({r['lmforge_ratio']:.3f}x) | accelerate {r['accelerate_mb']:8.1f} ({r['accelerate_ratio']:.3f}x)",
            flush=True,
        )
    result = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "measurement": "peak live tensor bytes, one step after a warm-up step (lmforge probe, MemoryTracker)",
        "rows": rows,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
