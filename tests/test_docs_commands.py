"""The shell commands the docs show, run: a documented command that fails fails the suite.

    pytest -q tests/test_docs_commands.py            # the fast subset (FAST)
    pytest -q -m slow tests/test_docs_commands.py    # every runnable block

The convention (docs/architecture.md, "Docs conventions"): every ```bash block of README.md and docs/*.md
says in its info string whether it runs as written:

    ```bash runnable                  each line (\\-continued) is run, in order, by bash -e
    ```bash not-run: <reason>         needs a GPU, the network, a multi-GB model, a server that stays up ...

A runnable block runs in a fresh directory holding `configs/` (the repository's) and the demo pipeline's
outputs that the block reads but does not write (runs/demo/{curated,tokenizer,tokens,pretrain,sft}, built
once per session by the same commands on a tiny corpus and model), with `lmforge` and `lmforge-lm-eval`
on PATH. Before it runs, each command gets the substitutions of SUBSTITUTIONS: overrides appended to make
it tiny (later overrides win) and names of example inputs replaced by small real ones. After the block,
every `output=DIR` it named must exist.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokenizer_corpus import TEXTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(bash|sh|shell|console)\b(.*)$")

# The demo pipeline at test size: model, data and step counts shrunk, everything else as documented.
TINY_MODEL = "'model_overrides={n_layers: 1, dim: 32, n_heads: 2, n_kv_heads: 1, hidden_dim: 64}'"
TINY_PRETRAIN = (
    f"model=tiny {TINY_MODEL} seq_len=64 global_batch=4 micro_batch=4 max_steps=2 nproc=1 threads=1 "
    "eval.every=2 eval.batches=1 eval.sample_tokens=4 checkpoint.every=1 log_every=1 schedule.warmup_steps=1"
)
TINY_TRAIN = "global_batch=4 micro_batch=4 max_steps=2 threads=1 log_every=1 schedule.warmup_steps=1"

# (regex on one command, replacement); applied in order to every command of a runnable block. CMD matches
# a command's start, environment assignments (`HF_HUB_OFFLINE=1 lmforge ...`) included.
CMD = r"^((?:[A-Z_]+=\S*\s+)*"
SUBSTITUTIONS: list[tuple[str, str]] = [
    (CMD + r"lmforge prepare .*configs/demo/prepare\.yaml.*)$", r"\1 input=raw workers=1"),  # 6 short plays
    (CMD + r"lmforge tokenizer train .*)$", r"\1 vocab_size=400"),
    (CMD + r"lmforge tokenize .*)$", r"\1 workers=1"),
    (CMD + r"lmforge pretrain .*)$", rf"\1 {TINY_PRETRAIN}"),
    (CMD + r"lmforge finetune .*)$", rf"\1 seq_len=64 {TINY_TRAIN} eval.every=0"),
    (CMD + r"lmforge align dpo .*)$", rf"\1 {TINY_TRAIN} max_len=64 max_prompt_len=32 eval.every=0"),
    (CMD + r"lmforge align reward .*)$", rf"\1 {TINY_TRAIN} max_len=64 max_prompt_len=32 eval.every=0"),
    (CMD + r"lmforge (generate|chat) .*)$", r"\1 sampling.max_tokens=4"),
    (CMD + r"lmforge generate .*watermark.*)$", r"\1 sampling.max_tokens=48"),  # enough tokens to detect
    (CMD + r"lmforge generate .*plain\.jsonl.*)$", r"\1 sampling.max_tokens=48"),
    (CMD + r"lmforge eval .*)$", r"\1 threads=1"),
    (CMD + r"lmforge quantize .*)$", r"\1 report.max_tokens=512 report.decode_tokens=2 report.repeats=1"),
    (CMD + r"lmforge quantize .*int4-gptq.*)$", r"\1 calibration.samples=4 calibration.seq_len=32"),
    (CMD + r"lmforge export .*)$", r"\1 new_tokens=2"),
    (CMD + r"lmforge-lm-eval .*)$", r"\1 --limit 4"),
    (r"checkpoints/step-000200", "checkpoints/step-000002"),  # the tiny run's last checkpoint
]

# Blocks run in the fast suite (file, a substring of the block): ones that need no demo run (building it
# takes ~30 s on 2 busy cores). The rest, lm-eval's included (its batch_size given twice once failed here;
# tests/test_eval_harness.py checks that case in the fast suite), run under -m slow.
FAST = [
    ("README.md", "lmforge model info"),
    ("docs/plan.md", "lmforge plan -c configs/plan/llama-1.1b-24gb.yaml"),
    ("docs/pipeline.md", "exp/pretrain.yaml"),  # --print-config: reads no data
]


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence
    info: str  # what follows the language in the info string
    commands: list[str]

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def strip_comment(line: str) -> str:
    """`line` without its shell comment (an unquoted # at the start or after a blank)."""
    quote = ""
    for k, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line.rstrip()


HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def _commands(lines: list[str]) -> list[str]:
    """Lines joined at trailing backslashes, without comments; blank lines dropped; a here-document
    (`cat > f <<'EOF'` ... `EOF`) stays verbatim in its command."""
    out, cur = [], ""
    rows = iter(lines)
    for raw in rows:
        line = strip_comment(raw)
        here = HEREDOC.search(line)
        if here is not None:
            body = []
            for text in rows:
                body.append(text)
                if text.strip() == here.group(1):
                    break
            out.append("\n".join([cur + line, *body]))
            cur = ""
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(" ".join(cur.split()) if "'" not in cur and '"' not in cur else cur.strip())
        cur = ""
    return out


def collect(paths: list[Path] = DOCS) -> list[Block]:
    """Every shell block of the docs, runnable or not."""
    blocks = []
    for path in paths:
        lines = path.read_text("utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if m is None:
                i += 1
                continue
            j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
            blocks.append(Block(rel, i + 1, m.group(2).strip(), _commands(lines[i + 1 : j])))
            i = j + 1
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.info == "runnable"]


def substitute(command: str) -> str:
    for pattern, repl in SUBSTITUTIONS:
        command = re.sub(pattern, repl, command)
    return command


def outputs(command: str) -> list[str]:
    """The `output=DIR` (or `--output_path DIR`) a command writes."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    found = [w.split("=", 1)[1] for w in words if w.startswith("output=")]
    found += [words[k + 1] for k, w in enumerate(words[:-1]) if w == "--output_path"]
    return found


# -- the collector itself -------------------------------------------------------------------------------
def test_every_shell_block_says_whether_it_runs() -> None:
    """A new ```bash block must be `runnable` or say why not: nothing is skipped silently."""
    blocks = collect()
    assert len(runnable(blocks)) >= 20
    bad = [b.id for b in blocks if b.info != "runnable" and not re.match(r"not-run: \S", b.info)]
    assert not bad, f"shell blocks neither `runnable` nor `not-run: <reason>`: {bad}"
    assert all(b.commands for b in runnable(blocks))
    fast = [b for b in runnable(blocks) if _is_fast(b)]
    assert len(fast) == len(FAST), [b.id for b in fast]


def test_collector_joins_continuations_and_applies_substitutions(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text(
        "text\n```bash runnable\n# a comment\nlmforge export hf a \\\n    output=b   # note\n\n"
        "lmforge eval -c e.yaml\ncat > t.yaml <<'EOF'\nk: v   # kept\nEOF\n```\n"
        "```bash not-run: needs a GPU\nnvidia-smi\n```\n```yaml\nk: v\n```\n"
    )
    blocks = collect([md])
    assert [(b.line, b.info) for b in blocks] == [(2, "runnable"), (12, "not-run: needs a GPU")]
    heredoc = "cat > t.yaml <<'EOF'\nk: v   # kept\nEOF"
    assert blocks[0].commands == ["lmforge export hf a output=b", "lmforge eval -c e.yaml", heredoc]
    assert substitute(blocks[0].commands[0]) == "lmforge export hf a output=b new_tokens=2"
    assert outputs(blocks[0].commands[0]) == ["b"]
    assert strip_comment("echo '# kept' # gone") == "echo '# kept'"


# -- running the blocks ---------------------------------------------------------------------------------
def _is_fast(block: Block) -> bool:
    return any(block.file == f and any(s in c for c in block.commands) for f, s in FAST)


def _env(bin_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LMFORGE_PROGRESS_INTERVAL": "3600",
    }


def _bash(
    script: str, cwd: Path, env: dict[str, str], timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


FIXTURES = ("curated", "tokenizer", "tokens", "pretrain", "sft")


@pytest.fixture(scope="session")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment blocks run in: `lmforge`, `lmforge-lm-eval` and `python` (this interpreter, as in an
    activated venv) on PATH, this checkout's sources."""
    bin_dir = tmp_path_factory.mktemp("docs-bin")
    for name, module in (("lmforge", "lmforge"), ("lmforge-lm-eval", "lmforge.eval.harness")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    return _env(bin_dir)


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """runs/demo/* built by the documented demo commands (substituted) on a tiny corpus."""
    work = tmp_path_factory.mktemp("docs-demo")
    (work / "raw").mkdir(parents=True)
    (work / "configs").symlink_to(ROOT / "configs")
    for f in sorted(TEXTS.glob("*.txt"))[:6]:  # the demo corpus, 6 plays cut to 12 KB each
        (work / "raw" / f.name).write_text(f.read_text("utf-8", errors="replace")[:12_000], encoding="utf-8")
    pipeline = [
        "lmforge prepare -c configs/demo/prepare.yaml output=runs/demo/curated",
        "lmforge tokenizer train -c configs/demo/tokenizer.yaml input=runs/demo/curated output=runs/demo/tokenizer",
        "lmforge tokenize -c configs/demo/tokenize.yaml input=runs/demo/curated tokenizer=runs/demo/tokenizer "
        "output=runs/demo/tokens",
        "lmforge pretrain -c configs/demo/pretrain.yaml data=runs/demo/tokens output=runs/demo/pretrain",
        "lmforge finetune -c configs/finetune/demo-lora.yaml base=runs/demo/pretrain/model output=runs/demo/sft",
    ]
    proc = _bash("\n".join(substitute(c) for c in pipeline), work, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def _run_block(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    env = request.getfixturevalue("env")
    commands = [substitute(c) for c in block.commands]
    written = {o for c in commands for o in outputs(c)}
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    # only then build the demo run (the demo configs read runs/demo/* themselves)
    if any("runs/demo" in c or "configs/demo/" in c or "input=raw" in c for c in commands):
        built: Path = request.getfixturevalue("demo")
        (tmp_path / "runs" / "demo").mkdir(parents=True)
        for name in FIXTURES:
            if f"runs/demo/{name}" not in written:
                (tmp_path / "runs" / "demo" / name).symlink_to(built / "runs" / "demo" / name)
        (tmp_path / "raw").symlink_to(built / "raw")
    proc = _bash("\n".join(commands), tmp_path, env)
    assert proc.returncode == 0, f"{block.id}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    missing = [o for o in written if not (tmp_path / o).exists()]
    assert not missing, f"{block.id}: documented outputs not written: {missing}"


BLOCKS = runnable(collect())


@pytest.mark.parametrize("block", [b for b in BLOCKS if _is_fast(b)], ids=lambda b: b.id)
def test_fast_documented_commands_run(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _run_block(block, request, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if not _is_fast(b)], ids=lambda b: b.id)
def test_documented_commands_run(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _run_block(block, request, tmp_path)
