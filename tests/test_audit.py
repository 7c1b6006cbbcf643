"""The audit trail: a hash-chained JSONL log that every command appends to (lmforge/audit.py, audit_cli.py).

Tamper detection is counted over every record of a 100-record log (edit, byte flip, delete, swap: all
detected), concurrent writers (processes and real CLI runs) leave a valid chain, signatures catch a chain
rewritten without the key, and the CLI hook records what a command read and wrote, for `audit lineage`.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import audit, cli
from lmforge.errors import IntegrityError

SRC = Path(__file__).resolve().parents[1] / "src"


def _log_of(tmp_path: Path, n: int, key: object = None) -> Path:
    log = tmp_path / "audit.jsonl"
    for i in range(n):
        audit.write_record(log, "command", {"command": "prepare", "i": i, "exit_code": i % 3}, key)
    return log


def _detected(log: Path, lines: list[bytes], head: bytes) -> str | None:
    """Write `lines` (and the original head) as the log; the verify error, or None if it passed."""
    log.write_bytes(b"".join(lines))
    audit.head_path(log).write_bytes(head)
    try:
        audit.verify(log)
    except IntegrityError as e:
        return str(e)
    return None


def test_a_clean_log_verifies(tmp_path: Path) -> None:
    log = _log_of(tmp_path, 100)
    result = audit.verify(log)
    assert [r["seq"] for r in result.records] == list(range(1, 101))
    assert result.records[0]["prev"] == audit.GENESIS
    assert all(b["prev"] == a["hash"] for a, b in zip(result.records, result.records[1:], strict=False))
    assert json.loads(audit.head_path(log).read_text()) == {"seq": 100, "hash": result.records[-1]["hash"]}


def test_every_edit_delete_and_swap_of_100_records_is_detected(tmp_path: Path) -> None:
    log = _log_of(tmp_path, 100)
    lines = log.read_bytes().splitlines(keepends=True)
    head = audit.head_path(log).read_bytes()
    rng = random.Random(0)
    counts = {"edit": 0, "flip": 0, "delete": 0, "swap": 0, "swap_far": 0}
    for i in range(100):
        rec = json.loads(lines[i])
        rec["data"]["exit_code"] = 7  # a canonical, well-formed edit: only the hash can tell
        edited = [*lines[:i], audit.canonical(rec) + b"\n", *lines[i + 1 :]]
        err = _detected(log, edited, head)
        counts["edit"] += err is not None and f"record {i + 1}: content does not match its hash" in err

        pos = rng.randrange(len(lines[i]) - 1)  # any byte but the newline
        flipped = bytearray(lines[i])
        flipped[pos] ^= 1 << rng.randrange(8)
        err = _detected(log, [*lines[:i], bytes(flipped), *lines[i + 1 :]], head)
        counts["flip"] += err is not None and f"record {i + 1}:" in err

        err = _detected(log, lines[:i] + lines[i + 1 :], head)
        where = f"record {i + 1}: sequence number {i + 2}" if i < 99 else "ends at record 99 but"
        counts["delete"] += err is not None and where in err

        if i < 99:
            swapped = [*lines[:i], lines[i + 1], lines[i], *lines[i + 2 :]]
            err = _detected(log, swapped, head)
            counts["swap"] += err is not None and f"record {i + 1}: sequence number {i + 2}" in err
        j = rng.choice([k for k in range(100) if k != i])
        far = list(lines)
        far[i], far[j] = far[j], far[i]
        counts["swap_far"] += _detected(log, far, head) is not None
    assert counts == {"edit": 100, "flip": 100, "delete": 100, "swap": 99, "swap_far": 100}
    assert _detected(log, lines, head) is None  # and the untouched log still passes


def test_a_missing_or_edited_head_and_a_torn_last_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _log_of(tmp_path, 5)
    head = audit.head_path(log)
    saved = head.read_bytes()
    head.unlink()
    with pytest.raises(IntegrityError, match=r"audit\.jsonl\.head: missing"):
        audit.verify(log)
    head.write_bytes(saved)
    log.write_bytes(log.read_bytes()[:-20])  # a crash mid-write
    with pytest.raises(IntegrityError, match="record 5: not a JSON object"):
        audit.verify(log)
    # the next append refuses to chain onto it, with one warning, and the caller goes on
    os.environ[audit.LOG_ENV] = str(log)
    try:
        assert audit.append("serve.start", {"model": "m"}) is None
    finally:
        del os.environ[audit.LOG_ENV]
    assert capsys.readouterr().err.count("warning: audit log") == 1


def _append_many(log: str, n: int) -> None:
    for i in range(n):
        audit.write_record(Path(log), "test", {"writer": os.getpid(), "i": i})


def test_concurrent_writers_keep_a_valid_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(log), 30)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * 6
    records = audit.verify(log).records
    assert len(records) == 180
    assert [r["seq"] for r in records] == list(range(1, 181))
    written = sorted((r["data"]["writer"], r["data"]["i"]) for r in records)
    assert written == sorted((p.pid, i) for p in procs for i in range(30))


def test_concurrent_real_commands_keep_a_valid_chain(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "a.txt").write_text("hello\n")
    (stage / "manifest.json").write_text(
        json.dumps(
            {"stage": "t", "files": {"a.txt": {"bytes": 6, "sha256": hashlib.sha256(b"hello\n").hexdigest()}}}
        )
    )
    log = tmp_path / "audit.jsonl"
    env = {**os.environ, "PYTHONPATH": str(SRC), audit.LOG_ENV: str(log)}
    env.pop(audit.KEY_ENV, None)
    cmd = [sys.executable, "-m", "lmforge", "data", "verify", str(stage)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    records = audit.verify(log).records
    assert len(records) == 6
    assert {r["pid"] for r in records} == {p.pid for p in procs}
    manifest = hashlib.sha256((stage / "manifest.json").read_bytes()).hexdigest()
    assert all(
        r["data"]["inputs"] == [{"key": "", "path": str(stage), "manifest": manifest}] for r in records
    )
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "audit", "verify", str(log)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "6 records, chain intact" in out.stdout
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join([lines[0], lines[2], lines[1], *lines[3:]]))
    out = subprocess.run(
        [sys.executable, "-m", "lmforge", "audit", "verify", str(log)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3
    assert out.stderr.strip().endswith(
        "record 2: sequence number 3 (a record was deleted, inserted or moved)"
    )


def test_signatures_catch_a_chain_rewritten_without_the_key(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    key_file, pub_file, other_pub = tmp_path / "audit.key", tmp_path / "audit.pub", tmp_path / "other.pub"
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    pub_file.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    other = Ed25519PrivateKey.generate().public_key()
    other_pub.write_bytes(other.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    log = _log_of(tmp_path, 20, audit.load_private_key(key_file))
    result = audit.verify(log, public_key=pub_file)
    assert (len(result.records), result.signed, result.signatures_checked) == (20, 20, True)
    assert {r["key"] for r in result.records} == {audit.fingerprint(key.public_key())}
    with pytest.raises(IntegrityError, match=r"record 1: not signed by the given key"):
        audit.verify(log, public_key=other_pub)

    # someone with write access but no key edits record 10 and re-hashes the chain from there on
    records = result.records
    records[9]["data"]["exit_code"] = 5
    prev = records[8]["hash"]
    for r in records[9:]:
        r["prev"] = prev
        r["hash"] = prev = audit.record_hash(r)
    log.write_bytes(b"".join(audit.canonical(r) + b"\n" for r in records))
    audit.head_path(log).write_text(json.dumps({"seq": 20, "hash": prev}))
    assert len(audit.verify(log).records) == 20  # the unsigned checks cannot tell...
    with pytest.raises(IntegrityError, match=r"record 10: invalid signature"):
        audit.verify(log, public_key=pub_file)  # ...the signatures can


def test_redaction_keeps_secrets_and_prompts_out_of_the_log() -> None:
    args = [
        "-c",
        "x.yaml",
        "api_key=sk-1",
        "prompt=hi there",
        "sampling.max_tokens=5",
        "tokenizer=tok",
        "auth.token=abc",
        "system=be terse",
        "data.train=[a.jsonl]",
        "password=pw",
        "api_keys_file=k.txt",
        "eval.prompts=[ROMEO.]",
    ]
    assert audit.redact(args) == [
        "-c", "x.yaml", "api_key=<redacted>", "prompt=<redacted>", "sampling.max_tokens=5", "tokenizer=tok",
        "auth.token=<redacted>", "system=<redacted>", "data.train=[a.jsonl]", "password=<redacted>",
        "api_keys_file=k.txt", "eval.prompts=<redacted>",
    ]  # fmt: skip


def _raw(tmp_path: Path) -> list[Path]:
    rng = random.Random(0)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "quick", "brown", "fox", "sheep"]
    paths = []
    for i in range(4):
        p = tmp_path / f"raw{i}.txt"
        p.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)))
        paths.append(p)
    return paths


def test_the_cli_hook_and_lineage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    monkeypatch.setenv(audit.LOG_ENV, str(log))
    monkeypatch.delenv(audit.KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    raw = _raw(tmp_path)
    inputs = "[" + ",".join(p.name for p in raw) + "]"
    assert cli.main(["prepare", f"input={inputs}", "output=cur", "quality.min_chars=10"]) == 0
    assert cli.main(["tokenizer", "train", "input=cur", "output=tok", "vocab_size=300"]) == 0
    assert cli.main(["tokenize", "input=cur", "tokenizer=tok", "output=tokens"]) == 0
    assert cli.main(["tokenize", "input=missing", "tokenizer=tok", "output=bad"]) == 3
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--help"])
    old = (tmp_path / "tokens/manifest.json").stat().st_mtime - 60
    os.utime(tmp_path / "tokens/manifest.json", (old, old))  # written a minute before the next command
    with pytest.raises(SystemExit):
        cli.main(["tokenize", "input=cur", "tokenizer=tok", "output=tokens", "--print-config"])
    records = audit.verify(log).records
    assert [(r["data"]["command"], r["data"]["exit_code"]) for r in records] == [
        ("prepare", 0), ("tokenizer train", 0), ("tokenize", 0), ("tokenize", 3), ("prepare", 0), ("tokenize", 0)
    ]  # fmt: skip
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    prep = records[0]["data"]
    assert [e["sha256"] for e in prep["inputs"]] == [sha(p) for p in raw]
    assert prep["outputs"] == [
        {"key": "output", "path": str(tmp_path / "cur"), "manifest": sha(tmp_path / "cur/manifest.json")}
    ]
    assert prep["config_sha256"] == sha(tmp_path / "cur/config.yaml")
    assert records[3]["data"]["outputs"] == []  # a failed command wrote nothing it can be credited with
    assert records[5]["data"]["outputs"] == []  # nor did --print-config, though output= names a finished one
    assert records[0]["user"] and records[0]["host"] and records[0]["pid"] == os.getpid()

    capsys.readouterr()
    assert cli.main(["audit", "verify"]) == 0
    assert "6 records, chain intact" in capsys.readouterr().out
    assert len(audit.verify(log).records) == 6  # the audit commands do not write to the log
    assert cli.main(["audit", "lineage", "tokens"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'tokens'}  manifest {sha(tmp_path / 'tokens/manifest.json')[:16]}")
    assert out[1].startswith("  made by record 3: lmforge tokenize at ")
    assert (
        sum("made by record 1: lmforge prepare" in line for line in out) == 2
    )  # via input= and the tokenizer
    assert sum(line.endswith("(raw file)") for line in out) == 4
    assert "made by record 2: lmforge tokenizer train" in "\n".join(out)
    assert cli.main(["audit", "lineage", "tokens/tokenizer"]) == 0  # a folder inside a stage's output
    assert capsys.readouterr().out.splitlines()[1].startswith("  made by record 3: lmforge tokenize at ")
    assert cli.main(["audit", "lineage", "raw0.txt"]) == 2  # no audited command wrote it

    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join([*lines[:1], *lines[2:]]))  # delete record 2
    assert cli.main(["audit", "lineage", "tokens"]) == 3  # lineage trusts only an intact chain
    assert "record 2: sequence number 3" in capsys.readouterr().err


def test_an_audit_failure_never_costs_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(audit.LOG_ENV, str(tmp_path))  # a folder: cannot be opened as the log
    assert cli.main(["model", "info", "tiny"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: audit log") == 1
    monkeypatch.setenv(audit.LOG_ENV, str(tmp_path / "audit.jsonl"))
    monkeypatch.setenv(audit.KEY_ENV, str(tmp_path / "no-such.key"))
    assert cli.main(["model", "info", "tiny"]) == 0
    assert "no-such.key: cannot read the audit signing key" in capsys.readouterr().err
    monkeypatch.delenv(audit.KEY_ENV)
    monkeypatch.setenv("RANK", "1")  # torchrun: only rank 0 (or the launcher) records
    assert cli.main(["model", "info", "tiny"]) == 0
    monkeypatch.delenv(audit.LOG_ENV)
    monkeypatch.delenv("RANK")
    assert cli.main(["model", "info", "tiny"]) == 0  # off unless set
    assert not (tmp_path / "audit.jsonl").exists()


@pytest.mark.slow
def test_lineage_of_a_pretrained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(audit.LOG_ENV, str(tmp_path / "audit.jsonl"))
    monkeypatch.delenv(audit.KEY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    inputs = "[" + ",".join(p.name for p in _raw(tmp_path)) + "]"
    assert cli.main(["prepare", f"input={inputs}", "output=cur", "quality.min_chars=10"]) == 0
    assert cli.main(["tokenizer", "train", "input=cur", "output=tok", "vocab_size=300"]) == 0
    assert cli.main(["tokenize", "input=cur", "tokenizer=tok", "output=tokens"]) == 0
    train = ["seq_len=32", "global_batch=4", "micro_batch=4", "max_steps=2", "nproc=1", "eval.every=2"]
    train += ["eval.batches=1", "eval.batch_size=2", "eval.prompts=[]", "checkpoint.every=2"]
    assert cli.main(["pretrain", "data=tokens", "output=pre", "model=tiny", *train]) == 0
    capsys.readouterr()
    assert cli.main(["audit", "lineage", "pre/model"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  made by record 4: lmforge pretrain at ")
    assert out[2].startswith(f"  data = {tmp_path / 'tokens'}  manifest ")
    assert out[3].startswith("    made by record 3: lmforge tokenize at ")
    assert "  model = tiny  (not hashed: a name (preset, built-in corpus))" in out
    assert sum(line.endswith("(raw file)") for line in out) == 4
