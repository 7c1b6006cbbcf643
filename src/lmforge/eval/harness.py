"""lm-evaluation-harness adapter: run `lm_eval` tasks on an lmforge model (`--model lmforge`).

    python -m lmforge.eval.harness --model lmforge --model_args path=runs/demo/pretrain,batch_size=8 \\
        --tasks my_task --include_path my_tasks/ --output_path results/

lm-eval finds models in its registry, and has no plugin entry point for models (checked in 0.4.x: its
registry is filled from a fixed table in `lm_eval.models`), so a bare `lm_eval --model lmforge` cannot see
ours. This module is that command with one addition: it registers `LmforgeLM` under the name "lmforge"
first, then hands every argument to lm-eval's own CLI (`lm_eval.__main__.cli_evaluate`). From Python,
`import lmforge.eval.harness` before `lm_eval.simple_evaluate(model="lmforge", ...)` does the same.

model_args: path (required; any folder `lmforge.model.source.load_model` accepts), batch_size (else
lm-eval's --batch_size, whose default is 1), device (else --device, else auto), max_length (the model's
max_seq_len), max_gen_toks (256). A key in model_args wins over the same lm-eval option: lm-eval passes its
own batch_size/device beside model_args, which for a key given twice would be a TypeError.
Log-likelihoods come from `lmforge.eval.tasks.score_continuations` (the same code `lmforge eval` scores
multiple-choice tasks with), generation from the lmforge `Engine`, rolling log-likelihoods from
`lmforge.eval.perplexity.stream_nll`.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from lmforge.device import pick_device
from lmforge.errors import ConfigError
from lmforge.eval.perplexity import stream_nll
from lmforge.eval.tasks import score_continuations
from lmforge.infer.engine import Engine, GenerationRequest
from lmforge.infer.sampling import SamplingParams
from lmforge.model.source import load_model


def _int(kwargs: dict[str, Any], key: str, default: int | None) -> int | None:
    value = kwargs.pop(key, None)
    if value is None or value == "auto":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args: {key}={value!r} is not an integer") from None


@register_model("lmforge")
class LmforgeLM(TemplateLM):
    """An lmforge model as an lm-eval `LM` (causal; log-likelihood, rolling log-likelihood, generation)."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> Any:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    def __init__(self, path: str | None = None, **kwargs: Any) -> None:
        super().__init__()

        if path is None:
            path = kwargs.pop("pretrained", None)
        if path is None:
            raise ConfigError("model_args: path=<model folder> is required, e.g. --model_args path=runs/x")
        self.batch_size_per_gpu = _int(kwargs, "batch_size", 8) or 8
        device = str(kwargs.pop("device", None) or "auto")
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm_eval's --device defaults to cuda; follow the machine rather than fail
        self.model, self.tok = load_model(str(path), device=pick_device(device, key="model_args: device"))
        self.max_length = _int(kwargs, "max_length", None) or self.model.cfg.max_seq_len
        self.max_gen_toks = _int(kwargs, "max_gen_toks", 256) or 256
        kwargs.pop("dtype", None)
        kwargs.pop("max_batch_size", None)  # for batch_size=auto, which takes the default here
        kwargs.pop("trust_remote_code", None)
        if kwargs:
            raise ConfigError(
                f"model_args: unknown keys {sorted(kwargs)} (known: path, batch_size, device, ...)"
            )
        self.engine = Engine(self.model, self.tok, max_batch_size=self.batch_size_per_gpu)

    # -- what TemplateLM needs ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return "lmforge"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tok.encode(string))

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return str(self.tok.decode(tokens))

    def _loglikelihood_tokens(
        self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[Any]:

        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = score_continuations(
            self.model, pairs, max_len=self.max_length, batch_size=self.batch_size_per_gpu
        )
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:

        out = []
        for req in requests:
            (text,) = req.args
            ids = [self.eot_token_id, *self.tok_encode(text)]
            nll, _ = stream_nll(self.model, ids, seq_len=self.max_length, batch_size=self.batch_size_per_gpu)
            out.append(-nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nll)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:

        reqs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_tokens = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=float(kw.pop("top_p", 1.0) or 1.0),
                top_k=int(kw.pop("top_k", 0) or 0),
                stop=[s for s in until if s],
                seed=kw.pop("seed", 1234),
            )
            # Keep the newest context that leaves room for the answer, as lm-eval's HF model does.
            ids = self.tok_encode(context)[-max(1, self.max_length - max_tokens) :] or [self.eot_token_id]
            reqs.append(GenerationRequest(ids, params))
        outs = [c.text for c in self.engine.generate(reqs)]
        for req, text in zip(requests, outs, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outs


def main() -> None:
    """`lm_eval`'s command line with the lmforge model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()


__all__ = ["LmforgeLM", "main"]
