"""`lmforge export FORMAT SRC output=DIR`: an HF folder, a GGUF file or an ONNX graph, with a parity report.

    lmforge export hf   runs/demo/pretrain output=runs/demo/export-hf
    lmforge export gguf runs/demo/pretrain output=runs/demo/export-gguf gguf_type=q8_0
    lmforge export onnx runs/demo/pretrain output=runs/demo/export-onnx
    lmforge export -c configs/export/gguf.yaml model=runs/demo/pretrain output=out/gguf

Every export is run back with its own runtime (transformers / llama.cpp or the GGUF reader / onnxruntime)
and compared with the source model on fixed prompts; the numbers go to <output>/parity.json and a table.
Unsupported combinations (a format the model cannot be written to, a GGUF type not implemented, a
quantized source) fail before anything is written. The output is built in <output>.partial and renamed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section, parse_command, save_config
from lmforge.data.manifest import write_manifest
from lmforge.errors import ConfigError, DataError
from lmforge.export.parity import DEFAULT_PROMPTS
from lmforge.io import atomic_write_json, staged_output
from lmforge.model.source import load_model

QUANT_MARKER = "quant_config.json"  # written by `lmforge quantize` next to its model


class ExportConfig(Section):
    """`lmforge export`: convert a trained model for other runtimes and prove the conversion."""

    format: Literal["hf", "gguf", "onnx"] = Field(
        description="hf: transformers folder; gguf: llama.cpp file; "
        "onnx: onnxruntime graphs (full sequence + KV-cache decode)"
    )
    model: str = Field(description="source: a run dir, an lmforge model folder, a checkpoint or an HF folder")
    output: Path = Field(description="output directory (built in <output>.partial, then renamed)")
    gguf_type: str = Field("f16", description="gguf weight type: f32, f16 or q8_0 (1-D tensors stay f32)")
    gguf_runtime: Literal["auto", "llama_cpp", "reader"] = Field(
        "auto",
        description="gguf parity runtime: llama_cpp (llama-cpp-python), reader (gguf's reader, dequantized "
        "into lmforge's model) or auto (llama_cpp when importable)",
    )
    verify: bool = Field(True, description="run the export back with its runtime and write parity.json")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="parity prompts")
    new_tokens: int = Field(32, ge=1, description="greedy tokens generated per prompt for the parity check")
    text: Path | None = Field(
        None, description="text file scored for the perplexity change (default: a sonnet)"
    )
    seq_len: int = Field(
        128, ge=2, description="window length for the perplexity check (capped at the context)"
    )
    onnx_decode: bool = Field(
        True,
        description="onnx: also write model-decode.onnx, a graph with a KV cache (past/present keys, values)",
    )
    threads: int = Field(0, ge=0, description="CPU threads for the runtimes (0: all)")
    overwrite: bool = Field(False, description="replace an existing output directory")


CONFIG = ExportConfig

ARTEFACT = {"gguf": "model.gguf", "onnx": "model.onnx"}
DECODE_GRAPH = "model-decode.onnx"


def _positional(argv: list[str]) -> list[str]:
    """`lmforge export gguf SRC ...` is `lmforge export format=gguf model=SRC ...`."""
    out, keys = [], ["format", "model"]
    skip = False
    for a in argv:
        if skip:
            out.append(a)
            skip = False
            continue
        if a in ("-c", "--config"):
            skip = True
        elif keys and not a.startswith("-") and "=" not in a:
            a = f"{keys.pop(0)}={a}"
        out.append(a)
    return out


def _model_dir(src: Path) -> Path:
    return src / "model" if (src / "model").is_dir() else src


def check_request(cfg: ExportConfig, model: Any) -> None:
    """Everything that can be refused without writing: raises ConfigError naming the problem."""
    from lmforge.model.transformer import Transformer

    if not isinstance(model, Transformer):
        raise ConfigError(f"export: the source is not an lmforge Transformer ({type(model).__name__})")
    if cfg.format == "hf":
        from lmforge.export.hf import check_supported

        check_supported(model)
    elif cfg.format == "gguf":
        from lmforge.export.gguf import check_supported as gguf_check

        gguf_check(model.cfg, cfg.gguf_type)
        if cfg.gguf_runtime == "llama_cpp":
            from lmforge.export.gguf import llama_cpp_available

            if not llama_cpp_available():
                raise ConfigError(
                    "gguf_runtime=llama_cpp: llama_cpp is not importable; pip install llama-cpp-python "
                    "(builds llama.cpp) or use gguf_runtime=reader"
                )
    else:
        from lmforge.export.onnx import check_supported as onnx_check

        onnx_check(model)


def _preflight(cfg: ExportConfig) -> None:
    src = Path(cfg.model)
    if not src.is_dir():
        raise DataError(f"model={src}: not a directory (a run dir, model folder, checkpoint or HF folder)")
    if (src / QUANT_MARKER).is_file() or (_model_dir(src) / QUANT_MARKER).is_file():
        raise ConfigError(
            f"model={src}: a quantized model (quant_config.json) cannot be exported; export the "
            "full-precision source instead (for llama.cpp, gguf_type=q8_0 quantizes during export)"
        )
    if cfg.format == "gguf" and cfg.gguf_type not in ("f32", "f16", "q8_0"):
        raise ConfigError(f"gguf_type={cfg.gguf_type!r} is not supported; supported: f32, f16, q8_0")
    if cfg.text is not None and not cfg.text.is_file():
        raise DataError(f"text={cfg.text}: file not found")
    if cfg.output.exists() and not cfg.overwrite:
        raise ConfigError(f"output={cfg.output} already exists; pass overwrite=true to replace it")


def _runner(cfg: ExportConfig, artefact: Path, tok: Any, max_len: int) -> tuple[Any, str, dict[str, Any]]:
    """(runner, runtime name, extra checks) for the written artefact."""
    texts = [*cfg.prompts, "Hello, world! <|im_start|>user\nhi<|im_end|>"]
    if cfg.format == "hf":
        from lmforge.export.hf import HfRunner

        hf = HfRunner(artefact)
        return hf, "transformers", hf.checks(tok, texts)
    if cfg.format == "onnx":
        from lmforge.export.onnx import OnnxRunner

        return OnnxRunner(artefact, cfg.threads), "onnxruntime", {}
    from lmforge.export.gguf import LlamaCppRunner, llama_cpp_available, read_gguf
    from lmforge.export.parity import torch_runner

    if cfg.gguf_runtime == "llama_cpp" or (cfg.gguf_runtime == "auto" and llama_cpp_available()):
        lc = LlamaCppRunner(artefact, n_ctx=max_len, threads=cfg.threads)
        return lc, "llama.cpp", {"tokenizer_match": all(lc.tokenize(t) == tok.encode(t) for t in texts)}
    model, _ = read_gguf(artefact)
    return torch_runner(model), "gguf-reader+lmforge", {}


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Check, load, write, verify; returns the report written to parity.json."""
    import torch

    _preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model)
    check_request(cfg, model)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"format": cfg.format, "source": str(cfg.model)}
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        if cfg.format == "hf":
            from lmforge.export.hf import write_hf

            write_hf(model, tok, stage)
            artefact = stage
        elif cfg.format == "gguf":
            from lmforge.export.gguf import write_gguf

            artefact = stage / ARTEFACT["gguf"]
            types = write_gguf(model, tok, artefact, cfg.gguf_type, name=Path(cfg.model).name)
            report["gguf_type"] = cfg.gguf_type
            report["tensor_types"] = sorted(set(types.values()))
            tok.save(stage / "tokenizer")  # for tools that want the HF tokenizer next to the file
        else:
            from lmforge.export.onnx import OPSET, write_onnx

            artefact = stage / ARTEFACT["onnx"]
            write_onnx(model, artefact)
            if cfg.onnx_decode:
                from lmforge.export.onnx import write_onnx_decode

                write_onnx_decode(model, stage / DECODE_GRAPH)
                report["decode_graph"] = DECODE_GRAPH
            tok.save(stage / "tokenizer")
            report |= {
                "opset": OPSET,
                "inputs": {"input_ids": "int64 (batch, seq)"},
                "outputs": {"logits": "float32 (batch, seq, vocab)"},
            }
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        if cfg.verify:
            report |= verify(cfg, model, tok, artefact)
        save_config(cfg, stage, "export")
        atomic_write_json(stage / "parity.json", report)
        if cfg.format == "hf":  # a model folder lmforge loads again: `load_model` checks it against this
            write_manifest(stage, stage="export")
    return report


def verify(cfg: ExportConfig, model: Any, tok: Any, artefact: Path) -> dict[str, Any]:
    from lmforge.export.parity import parity, torch_runner

    max_len = model.cfg.max_seq_len
    runner, runtime, checks = _runner(cfg, artefact, tok, max_len)
    text = cfg.text.read_text("utf-8") if cfg.text is not None else None
    from lmforge.export.parity import DEFAULT_TEXT

    text_ids = [tok.eos_id, *tok.encode(text if text is not None else DEFAULT_TEXT)]
    prompt_ids = [tok.encode(p)[: max_len - 1] or [tok.eos_id] for p in cfg.prompts]
    t0 = time.perf_counter()
    numbers = parity(
        torch_runner(model),
        runner,
        prompt_ids=prompt_ids,
        text_ids=text_ids,
        new_tokens=cfg.new_tokens,
        seq_len=min(cfg.seq_len, max_len),
        max_len=max_len,
    )
    if cfg.format == "onnx" and (artefact.parent / DECODE_GRAPH).is_file():
        checks["decode_graph_greedy_identical"] = _decode_graph_check(
            artefact.parent / DECODE_GRAPH, model, prompt_ids, cfg
        )
    close = getattr(runner, "close", None)
    if close is not None:
        close()
    return {
        "runtime": runtime,
        "parity": numbers,
        **checks,
        "text": str(cfg.text) if cfg.text is not None else "builtin:sonnet-18",
        "verify_seconds": round(time.perf_counter() - t0, 2),
    }


def _decode_graph_check(path: Path, model: Any, prompt_ids: list[list[int]], cfg: ExportConfig) -> int:
    """Prompts for which the KV-cache graph on onnxruntime generates exactly lmforge's greedy tokens."""
    from lmforge.export.onnx import OnnxDecoder
    from lmforge.export.parity import greedy, torch_runner

    dec = OnnxDecoder(path, model.cfg, cfg.threads)
    ref = torch_runner(model)
    n_max = model.cfg.max_seq_len
    same = 0
    for p in prompt_ids:
        want = greedy(ref, p, cfg.new_tokens, n_max)
        same += int(dec.generate(p, len(want)) == want)
    return same


def main(argv: list[str]) -> int:
    cfg = parse_command(
        _positional(argv),
        CONFIG,
        "export",
        "Export a model to an HF folder, a GGUF file (llama.cpp) or an ONNX graph, then run the export with its "
        "own runtime and compare it with the source (parity.json: logit difference, KL, greedy agreement, "
        "perplexity change).",
        "lmforge export gguf runs/demo/pretrain output=runs/demo/export-gguf gguf_type=q8_0",
    )
    report = run_export(cfg)
    if cfg.verify:
        from lmforge.export.parity import print_table

        print_table(report, f"{cfg.format} export parity ({cfg.output})")
    print(json.dumps({"output": str(cfg.output), "format": cfg.format}), file=sys.stdout)
    return 0


__all__ = ["CONFIG", "ExportConfig", "check_request", "main", "run_export"]
