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

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from lmforge import crypt
from lmforge.config import (
    ConfigFsPath,
    ConfigRef,
    EncryptionConfig,
    Section,
    capped,
    encryption_field,
    parse_command,
    save_config,
)
from lmforge.data.manifest import write_manifest
from lmforge.errors import ConfigError, DataError
from lmforge.export import gguf, hf, onnx
from lmforge.export.parity import (
    DEFAULT_PROMPTS,
    DEFAULT_TEXT,
    counted,
    forward_passes,
    greedy,
    parity,
    print_table,
    torch_runner,
)
from lmforge.io import atomic_write_json, staged_output
from lmforge.model.card import model_name, write_card
from lmforge.model.hub import local_path, pinned
from lmforge.model.source import load_model
from lmforge.model.transformer import Transformer
from lmforge.progress import Progress

QUANT_MARKER = "quant_config.json"  # written by `lmforge quantize` next to its model


class ExportConfig(Section):
    """`lmforge export`: convert a trained model for other runtimes and prove the conversion."""

    format: Literal["hf", "gguf", "onnx"] = Field(
        description="hf: transformers folder; gguf: llama.cpp file; "
        "onnx: onnxruntime graphs (full sequence + KV-cache decode)"
    )
    model: ConfigRef = Field(
        description="source: a run dir, an lmforge model folder, a checkpoint, an HF folder or hub id ORG/NAME"
    )
    output: ConfigFsPath = Field(description="output directory (built in <output>.partial, then renamed)")
    gguf_type: str = Field("f16", description="gguf weight type: f32, f16 or q8_0 (1-D tensors stay f32)")
    gguf_runtime: Literal["auto", "llama_cpp", "reader"] = Field(
        "auto",
        description="gguf parity runtime: llama_cpp (llama-cpp-python), reader (gguf's reader, dequantized "
        "into lmforge's model) or auto (llama_cpp when importable)",
    )
    verify: bool = Field(True, description="run the export back with its runtime and write parity.json")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="parity prompts")
    new_tokens: int = Field(32, ge=1, description="greedy tokens generated per prompt for the parity check")
    text: ConfigFsPath | None = Field(
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
    plaintext: bool = Field(
        False,
        description="write the export in plaintext although the source is encrypted or a key is set "
        "(other runtimes cannot read lmforge's encrypted files; docs/encryption.md)",
    )
    encryption: EncryptionConfig = encryption_field()


CONFIG = ExportConfig

ARTEFACT = {"gguf": "model.gguf", "onnx": "model.onnx"}
LIBRARY = {"hf": "transformers", "gguf": "gguf", "onnx": "onnx"}  # the model card's library_name
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
    if not isinstance(model, Transformer):
        raise ConfigError(f"export: the source is not an lmforge Transformer ({type(model).__name__})")
    if cfg.format == "hf":
        hf.check_supported(model)
    elif cfg.format == "gguf":
        gguf.check_supported(model.cfg, cfg.gguf_type)
        if cfg.gguf_runtime == "llama_cpp" and not gguf.llama_cpp_available():
            raise ConfigError(
                "gguf_runtime=llama_cpp: llama_cpp is not importable; pip install llama-cpp-python "
                "(builds llama.cpp) or use gguf_runtime=reader"
            )
    else:
        onnx.check_supported(model)


# The optional packages each format writes or checks with, and the extra that installs them.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hf": ("hf", ("transformers",)),
    "gguf": ("export", ("gguf",)),
    "onnx": ("export", ("onnx", "onnxruntime", "onnxscript")),
}


def check_extras(fmt: str) -> None:
    """A format whose packages are missing is refused before anything is loaded or written."""
    extra, modules = EXTRAS[fmt]
    missing = [m for m in modules if not _importable(m)]
    if missing:
        raise ConfigError(
            f"lmforge export {fmt} needs the {extra} extra (missing: {', '.join(missing)}): "
            f"pip install 'lmforge[{extra}]'"
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (made unimportable)
        return False


def _preflight(cfg: ExportConfig) -> None:
    check_extras(cfg.format)
    src = local_path(cfg.model)
    if not src.is_dir():
        raise DataError(
            f"model={src}: not a directory (a run dir, model folder, checkpoint, HF folder or hub id ORG/NAME)"
        )
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
    sealed = next((p for p in sorted(src.rglob("*")) if p.is_file() and crypt.is_encrypted(p)), None)
    if (sealed is not None or crypt.encrypting()) and not cfg.plaintext:
        why = f"{sealed} is encrypted" if sealed is not None else "a key is set (outputs are encrypted)"
        raise ConfigError(
            f"export: {why}, but {cfg.format} files for other runtimes are plaintext; pass plaintext=true "
            "to write the decrypted model to output"
        )


def _runner(cfg: ExportConfig, artefact: Path, tok: Any, max_len: int) -> tuple[Any, str, dict[str, Any]]:
    """(runner, runtime name, extra checks) for the written artefact."""
    texts = [*cfg.prompts, "Hello, world! <|im_start|>user\nhi<|im_end|>"]
    if cfg.format == "hf":
        runner = hf.HfRunner(artefact)
        return runner, "transformers", runner.checks(tok, texts)
    if cfg.format == "onnx":
        return onnx.OnnxRunner(artefact, cfg.threads), "onnxruntime", {}

    if cfg.gguf_runtime == "llama_cpp" or (cfg.gguf_runtime == "auto" and gguf.llama_cpp_available()):
        lc = gguf.LlamaCppRunner(artefact, n_ctx=max_len, threads=cfg.threads)
        return lc, "llama.cpp", {"tokenizer_match": all(lc.tokenize(t) == tok.encode(t) for t in texts)}
    model, _ = gguf.read_gguf(artefact)
    return torch_runner(model), "gguf-reader+lmforge", {}


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Check, load, write, verify; returns the report written to parity.json."""
    cfg = cfg.model_copy(update={"model": pinned(cfg.model)})  # a hub id's commit, saved in config.yaml
    _preflight(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model)
    check_request(cfg, model)
    crypt.restore(
        (crypt.current_key(), False)
    )  # plaintext=true (checked above): the export is for other runtimes
    t0 = time.perf_counter()
    report: dict[str, Any] = {"format": cfg.format, "source": str(cfg.model)}
    print(f"export {cfg.format}: writing {cfg.output}", file=sys.stderr, flush=True)
    with staged_output(cfg.output, overwrite=cfg.overwrite, resume=False) as stage:
        if cfg.format == "hf":
            hf.write_hf(model, tok, stage)
            artefact = stage
        elif cfg.format == "gguf":
            artefact = stage / ARTEFACT["gguf"]
            types = gguf.write_gguf(model, tok, artefact, cfg.gguf_type, name=model_name(cfg.model))
            report["gguf_type"] = cfg.gguf_type
            report["tensor_types"] = sorted(set(types.values()))
            tok.save(stage / "tokenizer")  # for tools that want the HF tokenizer next to the file
        else:
            artefact = stage / ARTEFACT["onnx"]
            onnx.write_onnx(model, artefact)
            if cfg.onnx_decode:
                onnx.write_onnx_decode(model, stage / DECODE_GRAPH)
                report["decode_graph"] = DECODE_GRAPH
            tok.save(stage / "tokenizer")
            report |= {
                "opset": onnx.OPSET,
                "inputs": {"input_ids": "int64 (batch, seq)"},
                "outputs": {"logits": "float32 (batch, seq, vocab)"},
            }
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        if cfg.verify:
            report |= verify(cfg, model, tok, artefact)
        save_config(cfg, stage, "export")
        atomic_write_json(stage / "parity.json", report)
        write_card(
            stage, stage=stage, kind="export", mcfg=model.cfg, library=LIBRARY[cfg.format], tags=[cfg.format]
        )
        if cfg.format == "hf":  # a model folder lmforge loads again: `load_model` checks it against this
            write_manifest(stage, stage="export")
    return report


def verify(cfg: ExportConfig, model: Any, tok: Any, artefact: Path) -> dict[str, Any]:
    max_len = model.cfg.max_seq_len
    print(f"export {cfg.format}: loading the export back for the parity check", file=sys.stderr, flush=True)
    runner, runtime, checks = _runner(cfg, artefact, tok, max_len)
    text = cfg.text.read_text("utf-8") if cfg.text is not None else None
    text_ids = [tok.eos_id, *tok.encode(text if text is not None else DEFAULT_TEXT)]
    prompt_ids = [tok.encode(p)[: max_len - 1] or [tok.eos_id] for p in cfg.prompts]
    seq_len = capped("seq_len", cfg.seq_len, max_len, say="seq_len" in cfg.model_fields_set)
    t0 = time.perf_counter()
    total = forward_passes(prompt_ids, text_ids, cfg.new_tokens, seq_len, max_len)
    with Progress(f"export {cfg.format} parity", total, "passes") as bar:
        numbers = parity(
            counted(torch_runner(model), bar.advance),
            counted(runner, bar.advance),
            prompt_ids=prompt_ids,
            text_ids=text_ids,
            new_tokens=cfg.new_tokens,
            seq_len=seq_len,
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

    dec = onnx.OnnxDecoder(path, model.cfg, cfg.threads)
    ref = torch_runner(model)
    n_max = model.cfg.max_seq_len
    same = 0
    with Progress("export onnx decode-graph check", len(prompt_ids), "prompts") as bar:
        for p in prompt_ids:
            want = greedy(ref, p, cfg.new_tokens, n_max)
            same += int(dec.generate(p, len(want)) == want)
            bar.advance()
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
        print_table(report, f"{cfg.format} export parity ({cfg.output})")
    print(json.dumps({"output": str(cfg.output), "format": cfg.format}), file=sys.stdout)
    return 0


__all__ = ["CONFIG", "EXTRAS", "ExportConfig", "check_extras", "check_request", "main", "run_export"]
