"""Supervised data: loss masks on chat templates, record formats, malformed records, packing, truncation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lmforge.data.batch import IGNORE_INDEX
from lmforge.data.chat import (
    SFTDataConfig,
    block_causal_mask,
    collate,
    encode_messages,
    load_sft,
    pack,
)
from lmforge.errors import DataError
from lmforge.model.config import get_preset
from lmforge.model.transformer import build_model
from lmforge.tokenizer import SpecialTokensConfig, Tokenizer, train_tokenizer
from lmforge.train.finetune import SFTBatches
from lmforge.train.objectives import causal_lm

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green, and a longer one."},
]

# Llama 3's template as shipped in tokenizer_config.json (the date and tool branches trimmed).
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Qwen2.5's: a default system turn when the conversation has none.
QWEN = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def char_tokenizer(template: str | None = None, extra: list[str] | None = None) -> Tokenizer:
    """Byte-level with no merges: one token per character, so expected token lists are easy to write."""
    special = SpecialTokensConfig(extra=extra or ["<|im_start|>", "<|im_end|>"])
    kw: dict[str, Any] = {"chat_template": template} if template else {}
    return train_tokenizer(["x"], vocab_size=len(special.ordered()) + 256, special_tokens=special, **kw)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A real merged BPE vocabulary (tokens cross character boundaries)."""
    from infer_helpers import make_tokenizer

    return make_tokenizer()


def targets_text(tok: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded runs of consecutive target tokens."""
    runs: list[list[int]] = []
    prev = False
    for i, m in zip(ids, mask, strict=True):
        if m:
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = m
    return [tok.decode(r) for r in runs]


def test_mask_is_exactly_the_assistant_tokens_chatml() -> None:
    tok = char_tokenizer()
    ex = encode_messages(tok, CHAT, "assistant", "t:1")
    # Built independently: the ChatML pieces, each encoded alone (no merges, so they concatenate).
    ids: list[int] = []
    want: list[bool] = []
    for m in CHAT:
        head = tok.encode(f"<|im_start|>{m['role']}\n")
        body = tok.encode(m["content"] + "<|im_end|>")
        tail = tok.encode("\n")
        learn = m["role"] == "assistant"
        ids += head + body + tail
        want += [False] * len(head) + [learn] * len(body) + [False] * len(tail)
    assert ex.ids == ids
    assert ex.mask == want
    assert sum(want) == len("Blue.") + len("Green, and a longer one.") + 2

    batch = collate([[ex]], tok.pad_id, packed=False)
    labels = batch["labels"][0]
    # labels[j] is the target for input position j (token j + 1): -100 wherever token j + 1 is not learned.
    for j in range(len(ids) - 1):
        assert int(labels[j]) == (ids[j + 1] if want[j + 1] else IGNORE_INDEX)

    # The masked loss equals the cross-entropy over the assistant tokens only.
    torch.manual_seed(0)
    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, n_layers=2), seed=0)
    loss_sum, n = causal_lm(model, batch)
    logits = model(torch.tensor([ids[:-1]]))[0]
    pos = [j for j in range(len(ids) - 1) if want[j + 1]]
    ref = F.cross_entropy(logits[pos], torch.tensor([ids[j + 1] for j in pos]), reduction="sum")
    assert int(n) == len(pos) == 31
    torch.testing.assert_close(loss_sum, ref, rtol=1e-6, atol=1e-5)


def test_mask_on_merged_bpe_tokens(bpe: Tokenizer) -> None:
    ex = encode_messages(bpe, CHAT, "assistant", "t:1")
    assert ex.ids == bpe.encode(bpe.apply_chat_template(CHAT))
    assert targets_text(bpe, ex.ids, ex.mask) == ["Blue.<|im_end|>", "Green, and a longer one.<|im_end|>"]
    everything = encode_messages(bpe, CHAT, "all", "t:1")
    assert everything.ids == ex.ids and all(everything.mask)


@pytest.mark.parametrize("template", ["llama3", "qwen"])
def test_mask_on_hf_templates(template: str) -> None:
    if template == "llama3":
        extra = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        tok = char_tokenizer(LLAMA3, extra)
        tok.bos_token = "<|begin_of_text|>"
        end = "<|eot_id|>"
    else:
        tok = char_tokenizer(QWEN)
        end = "<|im_end|>"
    msgs = CHAT[1:]  # no system turn: Qwen adds its default one
    ex = encode_messages(tok, msgs, "assistant", "t:1")
    rendered = tok.apply_chat_template(msgs)
    assert tok.decode(ex.ids) == rendered
    assert targets_text(tok, ex.ids, ex.mask) == ["Blue." + end, "Green, and a longer one." + end]
    if template == "qwen":
        assert "You are Qwen" in rendered


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_formats_render_as_the_same_conversation(tmp_path: Path) -> None:
    tok = char_tokenizer()
    chat = {"messages": [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}]}
    files = {
        "chat": write_jsonl(tmp_path / "c.jsonl", [chat]),
        "pc": write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+3", "completion": "5"}]),
        "alpaca": write_jsonl(tmp_path / "a.jsonl", [{"instruction": "2+3", "input": "", "output": "5"}]),
    }
    got = {k: load_sft(SFTDataConfig(train=[str(f)]), tok, seq_len=64).train[0] for k, f in files.items()}
    assert got["chat"].ids == got["pc"].ids == got["alpaca"].ids
    assert got["chat"].mask == got["pc"].mask == got["alpaca"].mask
    assert targets_text(tok, got["pc"].ids, got["pc"].mask) == ["5<|im_end|>"]
    # Alpaca's input joins the instruction with a blank line.
    a2 = write_jsonl(tmp_path / "a2.jsonl", [{"instruction": "Add", "input": "2+3", "output": "5"}])
    ex = load_sft(SFTDataConfig(train=[str(a2)]), tok, seq_len=64).train[0]
    assert "Add\n\n2+3" in tok.decode(ex.ids)
    # Plain: no template, prompt + completion + EOS; the completion and EOS are the targets.
    plain = load_sft(SFTDataConfig(train=[str(files["pc"])], template="plain"), tok, seq_len=64).train[0]
    assert plain.ids == [*tok.encode("2+35"), tok.eos_id]
    assert plain.mask == [False, False, False, True, True]


def test_tokenizer_without_a_chat_template(tmp_path: Path) -> None:
    """No template and no ChatML tokens (a base model's tokenizer): an error for chat, plain works."""
    tok = char_tokenizer(extra=["<|sep|>"])
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+3=", "completion": "5"}])
    with pytest.raises(DataError, match=r"data\.template=plain"):
        load_sft(SFTDataConfig(train=[str(path)]), tok, seq_len=64)
    ex = load_sft(SFTDataConfig(train=[str(path)], template="plain"), tok, seq_len=64).train[0]
    assert ex.ids == [*tok.encode("2+3=5"), tok.eos_id]
    assert targets_text(tok, ex.ids, ex.mask) == ["5<|endoftext|>"]


@pytest.mark.parametrize(
    ("records", "line", "expected"),
    [
        (
            [
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                "{oops",
            ],
            2,
            "not valid JSON",
        ),
        (
            [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                {"prompt": "a", "completion": "b"},
            ],
            2,
            "without ['messages']",
        ),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
            2,
            "'completion' must be a string",
        ),
        ([{"messages": [{"role": "robot", "content": "hi"}]}], 1, "messages[0] must be"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], 1, "no assistant message"),
        ([{"text": "hello"}], 1, "cannot tell the record format"),
        ([{"prompt": "end<|im_end|>", "completion": "b"}], 1, "special token '<|im_end|>'"),
    ],
)
def test_malformed_records_name_file_and_line(
    tmp_path: Path, records: list[Any], line: int, expected: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError) as e:
        load_sft(SFTDataConfig(train=[str(path)]), char_tokenizer(), seq_len=64)
    assert f"{path}:{line}" in str(e.value)
    assert expected in str(e.value)


def test_truncation_and_dropping_are_counted(tmp_path: Path) -> None:
    tok = char_tokenizer()
    recs = [
        {"prompt": "ab", "completion": "cd"},  # 26 tokens: fits
        {"prompt": "ab", "completion": "c" * 40},  # reply cut
        {"prompt": "p" * 60, "completion": "lost"},  # the reply is entirely past the cut
    ]
    data = load_sft(SFTDataConfig(train=[str(write_jsonl(tmp_path / "t.jsonl", recs))]), tok, seq_len=40)
    assert data.stats["records"] == 3
    assert data.stats["truncated"] == 2
    assert data.stats["dropped_no_targets"] == 1
    assert [len(e.ids) for e in data.train] == [
        len(
            tok.encode(
                tok.apply_chat_template(
                    [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
                )
            )
        ),
        41,
    ]


def test_validation_split_is_stable_and_disjoint(tmp_path: Path) -> None:
    tok = char_tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(200)])
    cfg = SFTDataConfig(train=[str(path)], val_fraction=0.1)
    a, b = load_sft(cfg, tok, seq_len=64), load_sft(cfg, tok, seq_len=64)
    assert [e.source for e in a.val] == [e.source for e in b.val]
    assert 8 <= len(a.val) <= 35 and len(a.train) + len(a.val) == 200
    assert not {e.source for e in a.val} & {e.source for e in a.train}


def test_packing_matches_unpacked_loss_per_example(tmp_path: Path) -> None:
    tok = char_tokenizer()
    recs = [{"prompt": "x" * (3 + i % 7), "completion": "y" * (1 + i % 5)} for i in range(12)]
    data = load_sft(SFTDataConfig(train=[str(write_jsonl(tmp_path / "p.jsonl", recs))]), tok, seq_len=96)
    rows = pack(data.train, 96)
    assert len(rows) < len(data.train)  # several examples per row
    assert sorted(i for r in rows for i in r) == list(range(12))
    assert all(sum(len(data.train[i].ids) - 1 for i in r) <= 96 for r in rows)

    model = build_model(get_preset("tiny", vocab_size=tok.vocab_size, n_layers=2), seed=0).eval()
    packed = collate([[data.train[i] for i in r] for r in rows], tok.pad_id, packed=True)
    assert packed["attn_mask"].shape == (
        len(rows),
        1,
        packed["input_ids"].shape[1],
        packed["input_ids"].shape[1],
    )
    with torch.no_grad():
        logits = model(
            packed["input_ids"], position_ids=packed["position_ids"], attn_mask=packed["attn_mask"]
        )
        per_tok = F.cross_entropy(logits.transpose(1, 2), packed["labels"], reduction="none")  # (B, T)
        got = []
        for b, r in enumerate(rows):
            t = 0
            for i in r:
                n = len(data.train[i].ids) - 1
                got.append(float(per_tok[b, t : t + n].sum()))
                t += n
        want = []
        for i in [i for r in rows for i in r]:
            single = collate([[data.train[i]]], tok.pad_id, packed=False)
            want.append(float(causal_lm(model, single)[0]))
    assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < 1e-5
    # Without the mask and positions the numbers differ: the test can fail.
    with torch.no_grad():
        leaky = F.cross_entropy(model(packed["input_ids"]).transpose(1, 2), packed["labels"], reduction="sum")
    assert abs(float(leaky) - sum(got)) > 1e-2


def test_block_mask_and_sliding_window() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    m = block_causal_mask(seg, pos)[0, 0].int().tolist()
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    w = block_causal_mask(seg, pos, window=2)[0, 0].int().tolist()
    assert w[2] == [0, 1, 1, 0, 0, 0]


def test_batches_are_a_pure_function_of_the_step(tmp_path: Path) -> None:
    tok = char_tokenizer()
    recs = [{"prompt": "p" * (i % 9), "completion": "c" * (1 + i % 4)} for i in range(40)]
    data = load_sft(SFTDataConfig(train=[str(write_jsonl(tmp_path / "b.jsonl", recs))]), tok, seq_len=64)
    kw: dict[str, Any] = {
        "seq_len": 64,
        "global_batch": 4,
        "micro_batch": 2,
        "pad_id": tok.pad_id,
        "packed": True,
    }
    a, b = SFTBatches(data.train, seed=3, **kw), SFTBatches(data.train, seed=3, **kw)
    for step in (5, 0, 2):  # any order: no hidden cursor
        for x, y in zip(a.micro_batches(step), b.micro_batches(step), strict=True):
            assert all(torch.equal(x[k], y[k]) for k in x)
    n = len(a.rows)
    seen = [r for s in range(n // 4) for r in a.row_indices(s)]
    assert len(set(seen)) == len(seen)  # no row twice within an epoch
    assert SFTBatches(data.train, seed=4, **kw).row_indices(0) != a.row_indices(0)
