"""What a hub id costs over a local folder: resolving ORG/NAME from the hub cache, and loading the model.

    .venv/bin/python -m benchmarks.hub

Builds a hub cache (models--bench--llama/{blobs,refs/main,snapshots/<commit>}) in a temporary HF_HOME
holding a random Llama saved by transformers (the `small` shape, 8.9M parameters with a 4096-token vocabulary, fp32), then, offline
(HF_HUB_OFFLINE=1, no network):
- resolution alone: `lmforge.model.hub.local_path("bench/llama")` against the peer, huggingface_hub's
  own `snapshot_download(local_files_only=True)` that it calls (the median of 200 calls each);
- a full load: lmforge `load_model(<snapshot folder>)`, lmforge `load_model("bench/llama")`, and
  `transformers.AutoModelForCausalLM.from_pretrained("bench/llama")` (the median of 7, alternating).
Results: benchmarks/results/hub.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "hub.json"
REPO = "bench/llama"
N_RESOLVE = 200
N_LOAD = 7


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="lmforge-hub-bench-"))
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    import transformers
    from huggingface_hub import snapshot_download

    from hub_helpers import add_snapshot, commit_hash
    from lmforge.export.hf import write_hf
    from lmforge.model.config import get_preset, num_params
    from lmforge.model.hub import local_path
    from lmforge.model.source import load_model
    from lmforge.model.transformer import build_model
    from lmforge.tokenizer import train_tokenizer
    from tokenizer_corpus import shakespeare_docs

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    tok = train_tokenizer([d["text"] for d in shakespeare_docs(2)], vocab_size=4096)
    cfg = get_preset("small", vocab_size=tok.vocab_size)
    src = home / "src"
    write_hf(build_model(cfg, seed=0), tok, src)
    snap = add_snapshot(home / "hub", REPO, src, commit_hash("bench"))

    resolve = {"lmforge local_path": [], "huggingface_hub snapshot_download": []}
    for _ in range(N_RESOLVE):
        resolve["lmforge local_path"].append(_timed(lambda: local_path(REPO)))
        resolve["huggingface_hub snapshot_download"].append(
            _timed(lambda: snapshot_download(REPO, local_files_only=True))
        )
    loads: dict[str, list[float]] = {"lmforge folder": [], "lmforge hub id": [], "transformers hub id": []}
    for _ in range(N_LOAD):
        loads["lmforge folder"].append(_timed(lambda: load_model(snap)))
        loads["lmforge hub id"].append(_timed(lambda: load_model(REPO)))
        loads["transformers hub id"].append(
            _timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(REPO, dtype=torch.float32))
        )
    ms = {k: statistics.median(v) * 1e3 for k, v in resolve.items()}
    s = {k: statistics.median(v) for k, v in loads.items()}
    result = {
        "model": {"preset": "small", "params": num_params(cfg), "dtype": "float32"},
        "resolve_ms_median": ms,
        "load_s_median": s,
        "ratios": {
            "resolve lmforge / huggingface_hub": ms["lmforge local_path"]
            / ms["huggingface_hub snapshot_download"],
            "load hub id / folder (lmforge)": s["lmforge hub id"] / s["lmforge folder"],
            "load lmforge / transformers (hub id)": s["lmforge hub id"] / s["transformers hub id"],
        },
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
