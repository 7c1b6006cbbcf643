"""Encryption at rest (lmforge.crypt): the segmented AES-256-GCM format, its key handling, and
`lmforge crypt keygen|encrypt|decrypt|rotate` on a real tokens directory (fast: tiny files)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge import crypt
from lmforge.cli import main
from lmforge.data.shards import SealedTokens, ShardSet
from lmforge.errors import ConfigError, IntegrityError
from lmforge.model.integrity import latest_checkpoint
from lmforge.train.loop import Interrupted
from train_helpers import make_tokens_dir, make_trainer, shakespeare_text

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(crypt.KEY_ENV, raising=False)
    crypt.reset()
    yield
    crypt.reset()


def seal(data: bytes, segment: int, key: bytes = KEY) -> bytes:
    out = io.BytesIO()
    w = crypt.EncryptedWriter(out, key, segment=segment)
    w.write(data)
    w.close()
    return out.getvalue()


def open_sealed(tmp_path: Path, blob: bytes, key: bytes | None = KEY) -> bytes:
    path = tmp_path / "f.enc"
    path.write_bytes(blob)
    reader = crypt.EncryptedReader(path, key)
    try:
        return reader.readall()
    finally:
        reader.close()


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 64 * 3 + 5])
def test_round_trip_and_random_reads(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    blob = seal(data, segment=64)
    # header + one 16-byte tag per segment (at least one segment, the last, even when empty)
    assert len(blob) == crypt.HEADER + size + 16 * max(1, -(-size // 64))
    assert open_sealed(tmp_path, blob) == data
    reader = crypt.EncryptedReader(tmp_path / "f.enc", KEY)
    assert reader.size == size == crypt.plain_size(tmp_path / "f.enc")
    rng = np.random.default_rng(size)
    for _ in range(20):
        a = int(rng.integers(0, size + 1))
        n = int(rng.integers(0, 200))
        assert reader.pread(a, n) == data[a : a + n]
    reader.close()


def test_every_single_byte_flip_is_caught(tmp_path: Path) -> None:
    blob = seal(os.urandom(200), segment=64)  # 4 segments: header, full segments and the short last one
    caught = 0
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            (tmp_path / "x").write_bytes(bad)
            with pytest.raises(IntegrityError, match="x"):
                crypt.read_bytes(tmp_path / "x")  # sniffs the magic, as every loader does
            caught += 1
    assert caught == 2 * len(blob) == 2 * (crypt.HEADER + 200 + 4 * 16)


def test_truncation_appending_and_reordering_are_caught(tmp_path: Path) -> None:
    blob = seal(os.urandom(200), segment=64)
    seg = 64 + 16
    body = blob[crypt.HEADER :]
    swapped = blob[: crypt.HEADER] + body[seg : 2 * seg] + body[:seg] + body[2 * seg :]
    dropped = blob[: crypt.HEADER] + body[seg:]  # the first segment removed
    whole_segments_cut = blob[: crypt.HEADER + 3 * seg]  # ends on a segment boundary, last flag missing
    # Cut anywhere after the 6-byte magic (a file cut inside it is no longer recognisable as ours: the
    # manifest, which every loader checks first, catches that one).
    cuts = [blob[:n] for n in range(len(crypt.MAGIC), len(blob))]
    bad = [*cuts, blob + b"\x00", blob + blob[-seg:], swapped, dropped, whole_segments_cut]
    for variant in bad:
        (tmp_path / "x").write_bytes(variant)
        with pytest.raises(IntegrityError):
            crypt.read_bytes(tmp_path / "x")
    assert len(bad) == len(blob) - 6 + 5


def test_wrong_and_missing_key(tmp_path: Path) -> None:
    blob = seal(b"secret weights", segment=64)
    with pytest.raises(IntegrityError, match="encrypted with another key"):
        open_sealed(tmp_path, blob, OTHER)
    with pytest.raises(IntegrityError, match=r"set encryption\.key_file or LMFORGE_KEY"):
        open_sealed(tmp_path, blob, None)
    # a forged key id (the wrong key's) still fails: the wrapped data key does not authenticate
    forged = bytearray(blob)
    forged[19:35] = crypt.key_id(OTHER)
    with pytest.raises(IntegrityError, match="does not authenticate"):
        open_sealed(tmp_path, bytes(forged), OTHER)


def test_two_files_of_the_same_plaintext_differ(tmp_path: Path) -> None:
    """A fresh data key and nonce prefix per file: equal plaintexts share no ciphertext."""
    data = bytes(1000)
    a, b = seal(data, 64), seal(data, 64)
    assert a[crypt.HEADER :][:64] != b[crypt.HEADER :][:64]
    assert bytes(64) not in a[crypt.HEADER :]


def test_key_encodings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert crypt.parse_key(KEY.hex(), "k") == KEY
    assert crypt.parse_key(base64.b64encode(KEY).decode() + "\n", "k") == KEY
    for bad in ("00" * 31, "zz" * 32, base64.b64encode(KEY[:16]).decode()):
        with pytest.raises(ConfigError, match="256-bit key"):
            crypt.parse_key(bad, "k")
    with pytest.raises(ConfigError, match=r"encryption\.key_file: .*missing\.key not found"):
        crypt.configure(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match=r"encryption\.enabled=true needs"):
        crypt.configure(None, enabled=True)
    monkeypatch.setenv(crypt.KEY_ENV, KEY.hex())
    crypt.reset()
    assert crypt.current_key() == KEY and crypt.encrypting()
    crypt.configure(None, enabled=False)  # decrypt inputs, write plaintext
    assert crypt.current_key() == KEY and not crypt.encrypting()


def test_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    assert main(["crypt", "keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = crypt.read_key_file(path)
    assert len(key) == 32 and crypt.key_id(key).hex() in capsys.readouterr().out
    assert main(["crypt", "keygen", str(path)]) == 2  # never overwrites a key
    assert crypt.read_key_file(path) == key
    assert "already exists" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokens_dir(tmp_path_factory.mktemp("tok") / "tokens", shakespeare_text(40_000))


def test_crypt_encrypt_rotate_decrypt_a_tokens_dir(
    tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "tokens"
    shutil.copytree(tokens, d)
    plain = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    arrays = [np.asarray(a).copy() for a in ShardSet(d, "train").arrays]
    (tmp_path / "old.key").write_text(KEY.hex())
    (tmp_path / "new.key").write_text(base64.b64encode(OTHER).decode())
    old, new = f"encryption.key_file={tmp_path / 'old.key'}", f"encryption.key_file={tmp_path / 'new.key'}"

    assert main(["crypt", "encrypt", str(d), old]) == 0
    sealed = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and crypt.is_encrypted(p))
    assert sealed == ["tokenizer/tokenizer.json", "train-00000.bin", "val-00000.bin"]
    assert main(["data", "verify", str(d)]) == 0  # no key needed: the manifest hashes the ciphertext
    capsys.readouterr()
    assert main(["pretrain", f"data={d}", f"output={tmp_path}/run", "model=tiny", "progress=false"]) == 3
    err = capsys.readouterr().err  # one line: the encrypted file, no key
    assert err.count("\n") == 1 and "encrypted (key id" in err and KEY.hex() not in err

    crypt.configure(tmp_path / "old.key")
    shards = ShardSet(d, "train")  # verify=True: ciphertext SHA-256 from the rewritten index.json
    assert isinstance(shards.arrays[0], SealedTokens)
    assert all(np.array_equal(a[:], b) for a, b in zip(shards.arrays, arrays, strict=True))
    assert np.array_equal(shards.arrays[0][5:4000], arrays[0][5:4000])

    body = (d / "train-00000.bin").read_bytes()[crypt.HEADER :]
    assert main(["crypt", "rotate", str(d), old, f"new_key_file={tmp_path / 'new.key'}"]) == 0
    assert (d / "train-00000.bin").read_bytes()[crypt.HEADER :] == body  # rewrapped, not re-encrypted
    assert main(["data", "verify", str(d)]) == 0
    capsys.readouterr()
    assert main(["crypt", "decrypt", str(d), old]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "encrypted with another key" in err

    assert main(["crypt", "decrypt", str(d), new]) == 0
    assert main(["data", "verify", str(d)]) == 0
    now = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    for rel in plain:  # the data files are back byte for byte (the manifest records them again)
        if rel.name not in ("manifest.json", "index.json"):
            assert now[rel] == plain[rel], rel


def test_crypt_refuses_a_changed_plaintext_file(
    tokens: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`encrypt` checks each plaintext file against its manifest first: sealing never launders a change."""
    d = tmp_path / "tokens"
    shutil.copytree(tokens, d)
    with open(d / "val-00000.bin", "r+b") as f:
        f.write(b"\x01\x00")
    (tmp_path / "k").write_text(KEY.hex())
    assert main(["crypt", "encrypt", str(d), f"encryption.key_file={tmp_path / 'k'}"]) == 3
    assert "val-00000.bin: SHA-256 differs" in capsys.readouterr().err
    assert not crypt.is_encrypted(d / "val-00000.bin")


def test_encrypted_checkpoints_resume_bit_exact(tmp_path: Path) -> None:
    """The shared loop on encrypted checkpoints: stopped mid-accumulation, resumed, it ends with the
    plaintext run's losses, weights and optimizer state exactly (the fast twin of test_crypt_pipeline)."""
    full = make_trainer(tmp_path / "plain", steps=6)
    ref = full.run()
    crypt.restore((KEY, True))
    stopped = make_trainer(
        tmp_path / "enc", steps=6, checkpoint_every=0, should_stop=lambda s, m: (s, m) == (3, 1)
    )
    with pytest.raises(Interrupted):
        stopped.run()
    saved = latest_checkpoint(tmp_path / "enc" / "checkpoints")
    assert saved is not None and crypt.is_encrypted(saved / "model.safetensors")
    assert crypt.is_encrypted(saved / "optimizer.safetensors")
    resumed = make_trainer(tmp_path / "enc", steps=6, init_seed=123)
    assert resumed.resume("auto") == saved
    after = resumed.run()
    assert stopped.state.losses + after.losses == ref.losses
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a, opt_b = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)
    crypt.restore((None, False))  # without the key the checkpoint is one IntegrityError naming the file
    with pytest.raises(IntegrityError, match=r"model\.safetensors: encrypted"):
        make_trainer(tmp_path / "enc", steps=6).resume("auto")


def test_sealed_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    """tensorfile: every dtype lmforge writes, empty and 0-d tensors, and the metadata (the DPO cache's key)."""
    from lmforge.model.tensorfile import load_tensors, read_metadata, save_tensors

    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(9),
        "u8": torch.arange(4, dtype=torch.uint8),
        "bool": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    crypt.restore((KEY, True))
    save_tensors(tensors, tmp_path / "t.safetensors", metadata={"fingerprint": "abc"})
    assert crypt.is_encrypted(tmp_path / "t.safetensors")
    assert read_metadata(tmp_path / "t.safetensors") == {"fingerprint": "abc"}
    got = load_tensors(tmp_path / "t.safetensors")
    assert sorted(got) == sorted(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
