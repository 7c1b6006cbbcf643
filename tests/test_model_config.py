"""ModelConfig, presets and the closed-form parameter / FLOP counts against built models and a FLOP counter."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.model.config import PRESETS, ModelConfig, flops_per_token, get_preset, num_params
from lmforge.model.transformer import Transformer, build_model

# Published parameter counts of the public models whose shapes the presets copy.
PUBLISHED = {
    "llama-3.2-1b": 1_235_814_400,
    "qwen2.5-0.5b": 494_032_768,
    "mistral-7b": 7_241_732_096,
    "gpt2-124m": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_public_shapes_have_published_parameter_counts(name: str) -> None:
    assert num_params(get_preset(name)) == PUBLISHED[name]


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("tiny", 0.9e6, 1.1e6),
        ("small", 9e6, 11e6),
        ("llama-350m", 320e6, 380e6),
        ("llama-1.1b", 1.05e9, 1.2e9),
    ],
)
def test_own_sizes_are_the_advertised_size(name: str, low: float, high: float) -> None:
    assert low <= num_params(get_preset(name)) <= high


def test_llama_1_1b_is_24_layers_width_2048_16_heads() -> None:
    cfg = get_preset("llama-1.1b")
    assert (cfg.n_layers, cfg.dim, cfg.n_heads) == (24, 2048, 16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_closed_form_count_equals_the_built_model(name: str) -> None:
    cfg = get_preset(name)
    with torch.device("meta"):  # shapes only: even mistral-7b costs nothing
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    assert num_params(cfg) == total
    assert num_params(cfg, embedding=False) == total - embed


@pytest.mark.parametrize(
    "cfg",
    [
        get_preset("tiny", tie_embeddings=False),
        get_preset("tiny", arch="gpt2", n_kv_heads=None, max_seq_len=64),
        get_preset("tiny", qkv_bias=True, n_kv_heads=1),
    ],
    ids=["llama-untied", "gpt2", "qwen-mqa"],
)
def test_flops_per_token_matches_torch_flop_counter(cfg: ModelConfig) -> None:
    """6N + 12*L*H*hd*T is exactly what torch counts for a forward + backward (matmuls and SDPA)."""
    model = build_model(cfg)
    B, T = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    counter = FlopCounterMode(display=False)
    # The math backend runs attention as bmm's, which the counter sees (CPU flash kernels it does not).
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(ids).float().sum().backward()
    assert counter.get_total_flops() / (B * T) == pytest.approx(flops_per_token(cfg, T), rel=1e-9)


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ConfigError) as e:
        get_preset("llama-9000")
    assert "llama-9000" in str(e.value) and "gpt2-124m" in str(e.value) and "qwen2.5-0.5b" in str(e.value)


def test_preset_overrides_are_validated() -> None:
    assert get_preset("small", vocab_size=4096).vocab_size == 4096
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        get_preset("small", n_kv_heads=3)


def test_config_embeds_in_yaml_and_round_trips(tmp_path: object) -> None:
    from pathlib import Path

    cfg = get_preset("llama-3.2-1b")
    path = Path(str(tmp_path)) / "m.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(ModelConfig, path) == cfg
    assert ModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(ConfigError, match="did you mean 'n_heads'"):
        load_config(ModelConfig, path, ["n_head=4"])
