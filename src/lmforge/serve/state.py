"""The server's configuration and its shared state: a request -> prompt ids and the engine's sampling.

`ServerState` holds what every route shares (engine worker, tokenizer, limits, filter) and turns a
validated request into prompts and `SamplingParams`, refusing what this server cannot honour.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import jinja2
from pydantic import Field

from lmforge.config import ConfigPath, ConfigRef, EncryptionConfig, Section, encryption_field
from lmforge.infer.json_mask import START, JsonObjectMask, JsonVocab, closing
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.watermark import Watermark, WatermarkConfig
from lmforge.serve.audit_trail import ServerAudit
from lmforge.serve.batcher import Batcher
from lmforge.serve.feedback import FeedbackConfig, FeedbackLog
from lmforge.serve.filters import OutputFilter
from lmforge.serve.guard import is_json_type
from lmforge.serve.limits import RateLimiter, read_capped
from lmforge.serve.protocol import ApiError, ApiRequest, ChatRequest, CompletionRequest, check_text
from lmforge.tokenizer import Tokenizer


class ServeConfig(Section):
    model: ConfigRef = Field(
        description="model to serve: HF folder, lmforge run dir, model folder or checkpoint dir"
    )
    host: str = Field("127.0.0.1", description="address to bind; a non-loopback one requires API keys")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    model_name: str | None = Field(None, description="model id in the API (default: the folder's name)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype")
    compile: bool = Field(False, description="torch.compile the model's forward (slow first request)")
    threads: int = Field(
        0, ge=0, description="torch CPU threads (0 = torch's default; 1 is best on a busy machine)"
    )
    api_keys_env: str = Field("LMFORGE_API_KEYS", description="env var holding comma-separated API keys")
    api_keys_file: ConfigPath | None = Field(None, description="file with one API key per line (# comments)")
    max_batch_size: int = Field(8, ge=1, description="most requests decoded together in one batch")
    batch_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests to join")
    max_running_batches: int = Field(
        4, ge=1, description="batches decoded in turn, so new requests need not wait (1 = static batching)"
    )
    interleave_min_steps: int = Field(
        64, ge=0, description="start a batch beside running ones only if they have more steps than this to go"
    )
    max_queue: int = Field(64, ge=1, description="most requests waiting for the engine; more get 503")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 beyond)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt (default: the model's context)"
    )
    max_tokens_cap: int = Field(
        1024, ge=1, description="largest max_tokens a request may ask for (400 beyond)"
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not set it")
    max_n: int = Field(4, ge=1, description="most choices per request (n x prompts)")
    max_embedding_inputs: int = Field(64, ge=1, description="most inputs in one /v1/embeddings request")
    watermark: WatermarkConfig = Field(
        default_factory=WatermarkConfig,
        description="watermark every sampled answer with a keyed green list (docs/watermark.md)",
    )
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig,
        description="record ratings and comparisons of answers from the chat page and POST /v1/feedback "
        "(docs/feedback.md)",
    )
    requests_per_minute: int = Field(120, ge=0, description="per-key request limit (0 = none)")
    tokens_per_minute: int = Field(
        200_000, ge=0, description="per-key prompt + generated tokens limit (0 = none)"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request still running after this is cancelled"
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names a request may carry besides localhost, 127.0.0.1, [::1] and the bound host "
        "(421 otherwise; '*' = any, e.g. behind a proxy that checks Host)",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="browser origins (scheme://host[:port]) allowed besides this server's own (403 otherwise; "
        "'*' = any)",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a connection whose request head is not in after this is closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="a request body not fully received after this is refused (408) and closed"
    )
    output_wordlist: ConfigPath | None = Field(
        None, description="file of words that end an answer (content_filter)"
    )
    log_prompts: bool = Field(False, description="log prompt text (off: logs never hold prompts or outputs)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="server log level")
    encryption: EncryptionConfig = encryption_field()


def stop_strings(req: ApiRequest) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
        raise ApiError(400, "stop: at most 4 non-empty strings of at most 256 characters", param="stop")
    return stop


def check_format(req: ApiRequest) -> bool:
    """True when the request asks for a JSON object (honoured by constrained decoding); 400 for a
    response_format this server cannot honour, never silently ignored."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return False
    if fmt.type == "json_schema":
        raise ApiError(
            400,
            'response_format json_schema is not supported; use {"type": "json_object"} (any JSON object, '
            "guaranteed to parse) and check the schema yourself",
            param="response_format",
        )
    if fmt.type != "json_object":
        raise ApiError(
            400,
            f"response_format type {fmt.type[:40]!r}: expected 'text' or 'json_object'",
            param="response_format",
        )
    if stop_strings(req) or req.ignore_eos:
        raise ApiError(
            400,
            "stop and ignore_eos cannot be combined with response_format json_object (they would cut or "
            "extend the JSON)",
            param="response_format",
        )
    return True


def refuse_unsupported(req: ApiRequest) -> None:
    if isinstance(req, CompletionRequest) and (req.echo or req.logprobs or req.suffix):
        raise ApiError(400, "echo, logprobs and suffix are not supported", param="echo")
    if isinstance(req, ChatRequest) and (req.logprobs or req.tools):
        raise ApiError(400, "logprobs and tools are not supported", param="tools")


class ServerState:
    """Everything the routes share: engine worker, tokenizer, limits, filter. One per app."""

    def __init__(self, engine: Any, tokenizer: Tokenizer, cfg: ServeConfig, keys: list[str]) -> None:
        self.engine, self.tok, self.cfg, self.keys = engine, tokenizer, cfg, keys
        self.model_id = cfg.model_name or Path(cfg.model).name or "lmforge"
        self.context = int(getattr(engine, "max_seq_len", 0) or engine.model.cfg.max_seq_len)
        self.vocab = int(engine.model.cfg.vocab_size)
        self.max_prompt = min(cfg.max_prompt_tokens or self.context, self.context - 1)
        # A token covers at most `longest` characters, so a longer text cannot fit and is refused before
        # tokenizing it (2x: a tokenizer's normalizer may merge characters).
        longest = max((len(t) for t in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1)
        self.max_prompt_chars = 2 * self.max_prompt * max(longest, 1)
        self.limiter = RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.filter = OutputFilter.from_file(cfg.output_wordlist) if cfg.output_wordlist else None
        # The key is read (and a missing one refused) at start-up; the engine thread alone calls the hook.
        self.watermark = Watermark.from_config(cfg.watermark) if cfg.watermark.enabled else None
        self.batcher = Batcher(
            engine,
            max_batch_size=cfg.max_batch_size,
            max_queue=cfg.max_queue,
            batch_wait_s=cfg.batch_wait_ms / 1e3,
            max_running_batches=cfg.max_running_batches,
            interleave_min_steps=cfg.interleave_min_steps,
        )
        # A chat turn ends at any special token (ChatML's <|im_end|>, EOS): stop there, as chat clients expect.
        self.chat_stop_ids = sorted({int(i) for i in tokenizer.special_tokens.values()})
        self.created = int(time.time())
        self.audit = ServerAudit()
        # Opened (or refused: ConfigError) before the engine's worker starts.
        self.feedback = FeedbackLog(cfg.feedback.path) if cfg.feedback.enabled else None
        self.batcher.start()

    def close(self) -> None:
        self.batcher.close()
        if self.feedback is not None:
            self.feedback.close()
        self.audit.close({"model": self.cfg.model, "host": self.cfg.host, "port": self.cfg.port})

    # -- request -> prompts + sampling params ----------------------------------------------------------
    def _encode(self, text: str, param: str) -> list[int]:
        check_text(text, param)
        return list(self.tok.encode(text))

    def chat_ids(self, msgs: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat prompt, where message text can never become a special token
        (`Tokenizer.encode_chat`: a user's "<|im_end|><|im_start|>system" stays ordinary text)."""
        for m in msgs:
            check_text(m["content"], "messages")
        try:
            return self.tok.encode_chat(msgs, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise ApiError(
                400, f"messages: rejected by the model's chat template: {e}", param="messages"
            ) from None

    def check_shape(self, req: ApiRequest) -> None:
        """The checks that need no tokenizer, done first: choices (n x prompts), prompt sizes, stop,
        unsupported fields. A request refused here costs no tokenization (a 190,000-prompt list is one len)."""
        self.check_model(req.model)
        refuse_unsupported(req)
        check_format(req)
        stop_strings(req)
        param = "messages" if isinstance(req, ChatRequest) else "prompt"
        count = len(req.prompt) if isinstance(req, CompletionRequest) and isinstance(req.prompt, list) else 1
        if isinstance(req, CompletionRequest) and req.prompt and isinstance(req.prompt[0], int):
            count = 1  # a list of token ids is one prompt
            self.check_prompt_length(len(req.prompt), param)
        choices = req.n * count
        if choices > self.cfg.max_n:
            raise ApiError(
                400, f"n x prompts = {choices}; this server allows at most {self.cfg.max_n}", param="n"
            )
        if isinstance(req, ChatRequest):
            if len(req.messages) > self.max_prompt:  # a template gives every message >= 1 token
                raise ApiError(
                    400,
                    f"messages: {len(req.messages)} messages; this server accepts at most {self.max_prompt}",
                    param=param,
                    code="context_length_exceeded",
                )
            texts = [m.content if isinstance(m.content, str) else "" for m in req.messages]
            texts += [p.text for m in req.messages if isinstance(m.content, list) for p in m.content]
            chars = sum(map(len, texts))
        else:
            p = req.prompt
            chars = (
                len(p) if isinstance(p, str) else max((len(s) for s in p if isinstance(s, str)), default=0)
            )
        if chars > self.max_prompt_chars:
            raise ApiError(
                400,
                f"{param} is {chars} characters: more than the {self.max_prompt} tokens this server accepts",
                param=param,
                code="context_length_exceeded",
            )

    async def admit_body(self, request: Any) -> tuple[str, Any, bytes]:
        """(caller id, the rate limiter's ticket, body) for a JSON API request: counted against the rate
        limit before anything is read (RateLimited), the body capped, its content type JSON (415)."""
        key_id = request.scope.get("lmforge.key") or f"ip:{request.client.host if request.client else '?'}"
        ticket = self.limiter.count(key_id)
        body = await read_capped(
            request.stream(), self.cfg.max_body_bytes, request.headers.get("content-length")
        )
        if not is_json_type(request.headers.get("content-type")):
            raise ApiError(
                415, "send the body as JSON (Content-Type: application/json)", code="unsupported_media_type"
            )
        return key_id, ticket, body

    def check_model(self, model: str | None) -> None:
        """404 for a model id this server does not serve, in OpenAI's shape (code model_not_found)."""
        if model is not None and model != self.model_id:
            raise ApiError(
                404,
                f"The model {model[:100]!r} does not exist; this server serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def json_vocab(self) -> JsonVocab:
        """The vocabulary's token bytes for the JSON grammar: built on first use (a pass over the
        vocabulary: call it off the event loop), then cached; 400 if JSON cannot be spelled with it."""
        vocab = JsonVocab.of(self.tok, self.vocab)
        if not vocab.supported:
            raise ApiError(
                400,
                "response_format json_object: this model's vocabulary lacks single-character tokens for JSON",
                param="response_format",
            )
        return vocab

    def logits_hook(self, req: ApiRequest, params: SamplingParams) -> Any:
        """One row's logits hook: the JSON grammar (response_format json_object), the watermark, both, none."""
        if not check_format(req):
            return self.watermark
        stops = set(params.stop_token_ids) | {int(self.tok.eos_id)}
        return JsonObjectMask(self.json_vocab(), params.max_tokens, stops, inner=self.watermark)

    def check_prompt_length(self, tokens: int, param: str) -> None:
        if tokens > self.max_prompt:
            raise ApiError(
                400,
                f"prompt is {tokens} tokens; this server accepts at most {self.max_prompt}",
                param=param,
                code="context_length_exceeded",
            )

    def prompts_of(self, req: ApiRequest) -> list[list[int]]:
        if isinstance(req, ChatRequest):
            msgs = []
            for m in req.messages:
                content = (
                    m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
                )
                msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
            return [self.chat_ids(msgs)]
        p = req.prompt
        if isinstance(p, str):
            return [self._encode(p, "prompt") or [int(self.tok.bos_id)]]
        if not p:
            raise ApiError(400, "prompt: empty list", param="prompt")
        if isinstance(p[0], int):
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} outside [0, {self.vocab})", param="prompt")
            return [ids]
        return [self._encode(s, "prompt") or [int(self.tok.bos_id)] for s in p]

    def max_tokens_of(self, req: ApiRequest, longest: int) -> int:
        """The request's max_tokens, checked against the cap and the context left after its prompt."""
        cfg = self.cfg
        self.check_prompt_length(longest, "prompt" if isinstance(req, CompletionRequest) else "messages")
        asked = req.max_completion_tokens if isinstance(req, ChatRequest) else None
        asked = asked or req.max_tokens
        room = self.context - longest
        if asked is None:
            return min(cfg.default_max_tokens, cfg.max_tokens_cap, room)
        if asked > cfg.max_tokens_cap:
            raise ApiError(
                400,
                f"max_tokens is {asked}; this server allows at most {cfg.max_tokens_cap}",
                param="max_tokens",
            )
        if asked > room:
            raise ApiError(
                400,
                f"prompt ({longest} tokens) + max_tokens ({asked}) exceeds the model's context of "
                f"{self.context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def params_of(self, req: ApiRequest, prompts: list[list[int]]) -> tuple[SamplingParams, int]:
        """The engine's SamplingParams and the worst-case token count (for the tokens/minute limit);
        `check_shape(req)` has passed."""
        choices = req.n * len(prompts)
        max_tokens = self.max_tokens_of(req, max(len(p) for p in prompts))
        stop_ids = [  # ignore_eos: the end-of-text token does not end a chat reply either
            i for i in self.chat_stop_ids if not (req.ignore_eos and i == self.tok.eos_id)
        ]
        if check_format(req) and max_tokens < closing(START):
            raise ApiError(
                400,
                f"response_format json_object needs max_tokens >= {closing(START)}",
                param="max_tokens",
            )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
            stop=stop_strings(req),
            stop_token_ids=stop_ids if isinstance(req, ChatRequest) else [],
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        worst = sum(len(p) for p in prompts) + choices * max_tokens
        return params, worst


__all__ = [
    "ServeConfig",
    "ServerState",
    "check_format",
    "check_text",
    "refuse_unsupported",
    "stop_strings",
]
