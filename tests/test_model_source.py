"""The one model resolver (`lmforge.model.source`): every folder kind loads the weights it holds, checkpoints
carry their shape, and LoRA / QLoRA runs load as base + adapter (generate works; logits match `lora merge`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from export_helpers import llama_cfg, save_model_dir
from infer_helpers import VOCAB, make_tokenizer
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.model.hf import load_hf, save_hf
from lmforge.model.lora import adapters_disabled, load_adapter
from lmforge.model.quant import load_quantized, save_quantized
from lmforge.model.source import load_model, model_config
from lmforge.model.transformer import Transformer, build_model
from lmforge.quant import quantize_model
from lmforge.tokenizer import Tokenizer

IDS = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    """An lmforge model folder (the base the LoRA runs below fine-tune)."""
    model = build_model(llama_cfg(vocab_size=VOCAB), seed=1).eval()
    return save_model_dir(model, tok, tmp_path_factory.mktemp("base") / "model")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _checkpoint(ckpt: Path, model: Transformer, step: int, with_config: bool) -> None:
    ckpt.mkdir(parents=True)
    sd = {
        "_orig_mod." + k: v.contiguous() for k, v in model.state_dict().items()
    }  # as a compiled model saves
    save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    if with_config:
        (ckpt / "model_config.json").write_text(json.dumps(model.cfg.model_dump(mode="json")))


def test_every_folder_kind_loads_its_weights(tmp_path: Path, tok: Tokenizer, base_dir: Path) -> None:
    ref, _ = load_model(base_dir)
    assert not ref.training
    # an HF folder
    save_hf(ref, tmp_path / "hf", tokenizer_dir=base_dir)
    hf, t = load_model(tmp_path / "hf")
    _same_weights(hf, load_hf(tmp_path / "hf")[0])
    assert t.encode("To be") == tok.encode("To be")
    # a finished run (model/) and the run itself
    run = tmp_path / "run"
    save_model_dir(ref, tok, run / "model")
    for path in (run, run / "model"):
        _same_weights(load_model(path)[0], ref)
    # a quantized folder
    save_quantized(quantize_model(copy.deepcopy(ref), "int8"), tmp_path / "int8", tokenizer=tok)
    q, _ = load_model(tmp_path / "int8")
    _same_weights(q, load_quantized(tmp_path / "int8"))
    assert getattr(q, "quant_spec", None) is not None


def test_checkpoint_shape_from_its_model_config_else_the_run(tmp_path: Path, tok: Tokenizer) -> None:
    """A checkpoint carrying model_config.json needs nothing else; an older one is shaped by config.yaml."""
    cfg = {"command": "pretrain", "data": str(tmp_path / "tokens"), "model": "tiny", "seq_len": 32}
    cfg["model_overrides"] = {"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 2, "hidden_dim": 64}
    (tmp_path / "tokens" / "tokenizer").mkdir(parents=True)
    (tmp_path / "tokens" / "index.json").write_text(json.dumps({"vocab_size": VOCAB}))
    tok.save(tmp_path / "tokens" / "tokenizer")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    shape = model_config(
        str(run)
    )  # rebuilt as pretraining built it: the preset + overrides, the data's vocab
    assert (shape.n_layers, shape.dim, shape.vocab_size) == (1, 32, VOCAB)
    old, new = build_model(shape, seed=2).eval(), build_model(shape, seed=3).eval()
    _checkpoint(run / "checkpoints" / "step-000010", old, 10, with_config=False)
    _checkpoint(run / "checkpoints" / "step-000020", new, 20, with_config=True)
    _same_weights(load_model(run)[0], new)  # the newest checkpoint
    _same_weights(load_model(run / "checkpoints" / "step-000010")[0], old)
    # a checkpoint with model_config.json loads without its run's config.yaml
    (run / "config.yaml").unlink()
    tok.save(run)  # the tokenizer is then found in the run folder
    model, t = load_model(run / "checkpoints" / "step-000020")
    _same_weights(model, new)
    assert t.encode("To be") == tok.encode("To be")
    with pytest.raises(DataError, match="a checkpoint needs"):
        load_model(run / "checkpoints" / "step-000010")  # an older checkpoint has nothing left to shape it
    # a fine-tuning run's config.yaml does not say how to rebuild a model
    (run / "config.yaml").write_text(yaml.safe_dump({"command": "finetune", "base": "tiny"}))
    with pytest.raises(ConfigError, match="a finetune run"):
        load_model(run / "checkpoints" / "step-000010")


def _finetune(tmp_path: Path, base: Path, method: str) -> Path:
    lines = [json.dumps({"prompt": f"count {i}", "completion": f"{i + 1}"}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / method
    args = [f"base={base}", f"method={method}", "max_steps=3", f"output={run}", "optim.lr=1e-2"]
    args += ["seq_len=32", "global_batch=8", "micro_batch=8", "threads=1", "progress=false"]
    args += ["tensorboard=false", f"data.train={tmp_path / 'train.jsonl'}", "data.val_fraction=0.1"]
    assert main(["finetune", *args]) == 0
    return run


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_run_loads_as_base_plus_adapter(
    tmp_path: Path, base_dir: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finetune(tmp_path, base_dir, method)
    model, tok = load_model(run)
    assert not model.training
    expected, base_tok = load_model(base_dir)
    assert tok.encode("count 3") == base_tok.encode("count 3")  # the tokenizer saved with the adapter
    load_adapter(expected, run / "adapter", quantize_base=method == "qlora")
    ours = _logits(model)
    torch.testing.assert_close(ours, _logits(expected.eval()), atol=0, rtol=0)
    torch.testing.assert_close(_logits(load_model(run / "adapter")[0]), ours, atol=0, rtol=0)
    with adapters_disabled(model):
        assert float((_logits(model) - ours).abs().max()) > 1e-4  # the adapter is applied
    capsys.readouterr()
    for path in (run, run / "adapter"):
        rc = main(["generate", f"model={path}", "prompt=count 3", "sampling.max_tokens=4", "device=cpu"])
        assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out
    # `lmforge lora merge` computes what the adapted model computes
    assert main(["lora", "merge", f"adapter={run}", f"output={tmp_path / 'merged'}"]) == 0
    merged, _ = load_model(tmp_path / "merged")
    assert float((_logits(merged) - ours).abs().max()) < 1e-5
