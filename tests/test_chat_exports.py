"""Chat exports that other runtimes stop at the end of a turn, and the model card of every folder.

A tiny model fine-tuned through the CLI to answer and then emit <|im_end|> is exported to HF and
`transformers.generate` stops there by itself (and runs on with the old eos-only config); the same for
llama.cpp on the GGUF export (slow). The README.md of the run's model, of the export and of a quantized copy
parses with `huggingface_hub.ModelCard` and carries the config, data hashes, evaluation and parity numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from lmforge.cli import main
from lmforge.data.manifest import verify_manifest
from lmforge.io import sha256_file
from lmforge.model.config import num_params, read_model_config
from lmforge.model.source import load_model
from lmforge.tokenizer import SpecialTokensConfig, Tokenizer, load_tokenizer, train_tokenizer

ANSWER = "hello there"
MAX_NEW = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer model that learned one chat turn, ANSWER<|im_end|>, by full fine-tuning (~10 s)."""
    d = tmp_path_factory.mktemp("turn")
    special = SpecialTokensConfig()
    # A few merges: llama.cpp refuses a BPE vocabulary without any.
    corpus = [f"{ANSWER} Greet me. user assistant"] * 4
    train_tokenizer(corpus, vocab_size=len(special.ordered()) + 256 + 12, special_tokens=special).save(
        d / "tok"
    )
    row = {"messages": [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": ANSWER}]}
    (d / "train.jsonl").write_text((json.dumps(row) + "\n") * 8)
    (d / "val.jsonl").write_text(json.dumps(row) + "\n")
    argv = [
        "finetune", "base=tiny", f"tokenizer={d / 'tok'}", "method=full", f"data.train={d / 'train.jsonl'}",
        f"data.val={d / 'val.jsonl'}",
        "model_overrides={n_layers: 1, dim: 32, n_heads: 2, n_kv_heads: 2, hidden_dim: 64}",
        "data.packing=false", "seq_len=48", "global_batch=8", "micro_batch=8", "max_steps=60", "optim.lr=1e-2",
        "schedule.warmup_steps=5", "threads=1", "progress=false", "tensorboard=false", "eval.every=30",
        f"output={d / 'run'}",
    ]  # fmt: skip
    assert main(argv) == 0
    return d / "run"


def _prompt(tok: Tokenizer) -> list[int]:
    return tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Greet me."}], add_generation_prompt=True)
    )


def test_transformers_generate_stops_at_the_turn_end(run: Path, tmp_path: Path) -> None:
    import transformers

    assert main(["export", "hf", str(run), f"output={tmp_path / 'hf'}", "new_tokens=8"]) == 0
    out = tmp_path / "hf"
    tok = load_tokenizer(out)
    im_end = tok.special_tokens["<|im_end|>"]
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == [tok.eos_id, im_end], name
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == tok.chat_template
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "Greet me."}]
    text = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    assert ids[0].tolist() == _prompt(tok)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, ids.shape[1] :].tolist()
        # The same model with only <|endoftext|> as end of sequence (the export before) runs past the turn end.
        past = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_id)[0]
    assert gen[-1] == im_end and len(gen) == len(tok.encode(ANSWER)) + 1 < MAX_NEW
    assert tok.decode(gen[:-1]) == ANSWER
    assert len(past) - ids.shape[1] == MAX_NEW


@pytest.mark.slow
def test_llama_cpp_stops_at_the_turn_end(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from lmforge.export.gguf import LlamaCppRunner, read_metadata

    argv = [
        "export",
        "gguf",
        str(run),
        f"output={tmp_path / 'gguf'}",
        "gguf_type=f32",
        "gguf_runtime=llama_cpp",
    ]
    assert main([*argv, "new_tokens=8"]) == 0
    tok = load_tokenizer(run / "model")
    import gguf

    meta = read_metadata(gguf.GGUFReader(str(tmp_path / "gguf" / "model.gguf")))
    assert meta["tokenizer.ggml.eot_token_id"] == tok.special_tokens["<|im_end|>"]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["general.name"] == "run"  # the run's name, not the folder name "model"
    llm = LlamaCppRunner.load(tmp_path / "gguf" / "model.gguf", n_ctx=128, verbose=False)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "Greet me."}], add_generation_prompt=True)
        out = llm.create_completion(text, max_tokens=MAX_NEW, temperature=0.0)
    finally:
        llm.close()
    assert out["choices"][0]["finish_reason"] == "stop", out
    assert out["choices"][0]["text"] == ANSWER
    assert out["usage"]["completion_tokens"] < MAX_NEW


def _card(folder: Path) -> tuple[dict, str]:
    card = ModelCard.load(folder / "README.md")
    return card.data.to_dict(), card.text


def test_every_model_folder_gets_a_model_card(run: Path, tmp_path: Path) -> None:
    data_sha = f"sha256:{sha256_file(run.parent / 'train.jsonl')}"
    meta, text = _card(run / "model")
    assert meta["license"] == "other" and meta["library_name"] == "lmforge"
    assert meta["datasets"] == sorted({data_sha, f"sha256:{sha256_file(run.parent / 'val.jsonl')}"})
    assert {"lmforge", "finetune", "full"} <= set(meta["tags"]) and meta["pipeline_tag"] == "text-generation"
    summary = json.loads((run / "summary.json").read_text())
    assert "max_steps: 60" in text and f"| val_loss | {summary['val_after']['val_loss']:.6g} |" in text
    mcfg = read_model_config(run / "model" / "model_config.json")
    assert f"| parameters | {num_params(mcfg):,} |" in text and f"| layers | {mcfg.n_layers} |" in text
    assert "model/README.md" in verify_manifest(run)["files"]  # covered by the run's manifest, which holds

    assert main(["export", "hf", str(run), f"output={tmp_path / 'hf'}", "new_tokens=4"]) == 0
    meta, text = _card(tmp_path / "hf")
    parity = json.loads((tmp_path / "hf" / "parity.json").read_text())
    assert meta["library_name"] == "transformers" and {"export", "hf"} <= set(meta["tags"])
    assert data_sha in meta["datasets"]  # the data the source run was trained on
    assert f"| parity.greedy_agreement | {parity['parity']['greedy_agreement']:.6g} |" in text
    assert "The training run it comes from" in text and "max_steps: 60" in text
    assert "README.md" in verify_manifest(tmp_path / "hf")["files"]
    load_model(tmp_path / "hf")  # its manifest still verifies on load

    q = ["quantize", f"model={run}", "method=int8", f"output={tmp_path / 'q'}", "report.decode_tokens=4"]
    assert main([*q, "report.repeats=1"]) == 0
    meta, text = _card(tmp_path / "q")
    assert {"lmforge", "quantized", "int8"} <= set(meta["tags"]) and data_sha in meta["datasets"]
    size = json.loads((tmp_path / "q" / "quant_report.json").read_text())["size"]
    assert f"| size.bits_per_weight | {size['bits_per_weight']:.6g} |" in text
    assert f"| size.file_bytes | {size['file_bytes']} |" in text
    assert "README.md" in verify_manifest(tmp_path / "q")["files"]
