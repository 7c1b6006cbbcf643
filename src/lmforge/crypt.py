"""Encryption at rest: a streaming, seekable AES-256-GCM file format and the process's key.

    lmforge crypt keygen secret.key               # 32 random bytes, hex, mode 0600
    lmforge pretrain -c cfg.yaml encryption.key_file=secret.key   # or: export LMFORGE_KEY=<hex>

Every encrypted file has its own random 256-bit data key, wrapped (AES-256-GCM) by the user's key, and
is sealed in fixed-size segments (the STREAM construction of Hoang, Reyhanitabar, Rogaway and Vizar):

    stream head   b"LMFENC" | version u8 | 0 u8 | segment size u32 BE | nonce prefix (7 random bytes)
    key block     key id (16 bytes: SHA-256 of the user key, never the key) | wrap nonce (12) | wrapped key (48)
    segments      AES-256-GCM(data key, nonce = prefix | counter u32 BE | last u8, aad = stream head)

The counter and the last-segment flag in each nonce catch reordering, truncation and appending; the
stream head is authenticated by every segment and the key block by the wrap (whose associated data is
the stream head and the key id). `rotate` rewraps the data key and leaves the segments byte for byte.
A reader decrypts one segment at a time, so memory stays bounded and token shards are read at random
offsets without a plaintext copy on disk. Any failure is one `IntegrityError` line naming the file.

The key comes from `encryption.key_file` (set once per process by `config.parse_command`) or from the
`LMFORGE_KEY` environment variable; a key file or variable holds 32 bytes as 64 hex digits or base64.
`cryptography` (the [encrypt] extra) is imported only when a file is encrypted or decrypted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO

from lmforge.errors import ConfigError, IntegrityError

KEY_ENV = "LMFORGE_KEY"
MAGIC = b"LMFENC"
VERSION = 1
SEGMENT = 1 << 20  # plaintext bytes per segment: 16 bytes of tag per MiB, one MiB of memory per reader
TAG = 16
_HEAD = struct.Struct(">6sBBI7s")  # magic, version, reserved, segment size, nonce prefix
_KEY_BLOCK = 16 + 12 + 48
HEADER = _HEAD.size + _KEY_BLOCK

KeyState = tuple[bytes | None, bool]  # (key, encrypt outputs)
_configured: KeyState | None = None  # set once a command configured it


def fsync_dir(path: Path) -> None:
    """Persist a directory entry (a rename or a new file) on POSIX filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_key(text: str, where: str) -> bytes:
    """32 bytes from 64 hex digits or base64; ConfigError naming `where` otherwise."""
    s = text.strip()
    try:
        key = bytes.fromhex(s) if len(s) == 64 else base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{where}: expected a 256-bit key as 64 hex digits or base64 of 32 bytes")
    return key


def read_key_file(path: Path) -> bytes:
    path = Path(path)
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise ConfigError(
            f"encryption.key_file: {path} not found (make one: lmforge crypt keygen FILE)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"encryption.key_file: {path} is not a readable text key file ({e})") from None
    return parse_key(text, f"encryption.key_file: {path}")


def env_key() -> bytes | None:
    value = os.environ.get(KEY_ENV)
    return parse_key(value, KEY_ENV) if value else None


def configure(key_file: Path | None = None, enabled: bool | None = None) -> None:
    """Set this process's key (`key_file`, else $LMFORGE_KEY) and whether outputs are encrypted
    (`enabled`; by default whenever a key is set). Loaders decrypt with the key either way."""
    global _configured
    key = read_key_file(key_file) if key_file is not None else env_key()
    if enabled and key is None:
        raise ConfigError(f"encryption.enabled=true needs encryption.key_file or {KEY_ENV}")
    _configured = (key, key is not None if enabled is None else enabled)


def reset() -> None:
    """Forget the configured key (back to $LMFORGE_KEY); for tests and long-lived processes."""
    global _configured
    _configured = None


def state() -> KeyState:
    """This process's key and policy, for a worker process to `restore` (spawned workers inherit neither)."""
    return current_key(), encrypting()


def restore(saved: KeyState) -> None:
    global _configured
    _configured = saved


def current_key() -> bytes | None:
    return _configured[0] if _configured is not None else env_key()


def encrypting() -> bool:
    """Whether writers seal what they write: a key is set and `encryption.enabled` is not false."""
    return _configured[1] if _configured is not None else env_key() is not None


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"lmforge key id\x00" + key).digest()[:16]


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise ConfigError(
            "encryption at rest needs the encrypt extra: pip install 'lmforge[encrypt]'"
        ) from None
    return AESGCM(key)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, int(last))


def _key_block(head: bytes, data_key: bytes, key: bytes) -> bytes:
    kid, wrap_nonce = key_id(key), secrets.token_bytes(12)
    return kid + wrap_nonce + _aesgcm(key).encrypt(wrap_nonce, data_key, head + kid)


def is_encrypted(path: Path | str) -> bool:
    """Whether `path` starts with this format's magic (a plaintext file of ours never does). A magic one
    byte off followed by this format's version is a damaged encrypted file, not plaintext: IntegrityError."""
    try:
        with open(path, "rb") as f:
            start = f.read(8)
    except OSError:
        return False
    if start[:6] == MAGIC:
        return True
    if (
        len(start) == 8
        and start[6:] == bytes([VERSION, 0])
        and sum(a != b for a, b in zip(start, MAGIC, strict=False)) == 1
    ):
        raise IntegrityError(f"{path}: an lmforge encrypted file whose header is modified")
    return False


class EncryptedWriter(io.RawIOBase):
    """Seal bytes written to it onto `raw` (a binary file), one segment at a time."""

    def __init__(self, raw: IO[bytes], key: bytes, segment: int = SEGMENT) -> None:
        self.raw, self.segment = raw, segment
        self.data_key = secrets.token_bytes(32)
        self.head = _HEAD.pack(MAGIC, VERSION, 0, segment, secrets.token_bytes(7))
        raw.write(self.head + _key_block(self.head, self.data_key, key))
        self._aead, self._prefix = _aesgcm(self.data_key), self.head[-7:]
        self._buf, self._counter = bytearray(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = len(view)
        while len(view):  # a full segment is sealed only once more data follows: close() seals the last
            if len(self._buf) == self.segment:
                self._seal(self._buf, last=False)
                self._buf = bytearray()
            if not self._buf and len(view) > self.segment:  # straight from the caller's buffer, no copy
                self._seal(view[: self.segment], last=False)
                view = view[self.segment :]
                continue
            take = min(self.segment - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
        return n

    def _seal(self, chunk: Any, last: bool) -> None:
        self.raw.write(self._aead.encrypt(_nonce(self._prefix, self._counter, last), chunk, self.head))
        self._counter += 1

    def close(self) -> None:
        if not self.closed and not self.raw.closed:
            self._seal(bytes(self._buf), last=True)
            self._buf = bytearray()
        super().close()


class EncryptedReader(io.RawIOBase):
    """Seekable plaintext view of an encrypted file; checks the header and the last segment on open,
    every other segment when it is first read. Holds one decrypted segment in memory."""

    def __init__(self, path: Path | str, key: bytes | None = None) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self._pos, self._cached = 0, (-1, b"")
        try:
            self._open(current_key() if key is None else key)
        except BaseException:
            self._f.close()
            raise

    def _fail(self, what: str) -> IntegrityError:
        return IntegrityError(f"{self.path}: {what}")

    def _open(self, key: bytes | None) -> None:
        header = self._f.read(HEADER)
        if len(header) < HEADER or header[:6] != MAGIC:
            raise self._fail("not an lmforge encrypted file (header truncated or modified)")
        _, version, reserved, self.segment, prefix = _HEAD.unpack(header[: _HEAD.size])
        if version != VERSION or reserved != 0:
            raise self._fail(f"encrypted file format version {version}, this lmforge reads {VERSION}")
        self.head, self._prefix = header[: _HEAD.size], prefix
        kid, wrap_nonce, wrapped = header[19:35], header[35:47], header[47:HEADER]
        if key is None:
            raise self._fail(f"encrypted (key id {kid.hex()}); set encryption.key_file or {KEY_ENV}")
        if kid != key_id(key):
            raise self._fail(
                f"encrypted with another key (key id {kid.hex()}, the given key is {key_id(key).hex()})"
            )
        wrap = _aesgcm(key)
        from cryptography.exceptions import InvalidTag

        self._invalid = InvalidTag
        try:
            data_key = wrap.decrypt(wrap_nonce, wrapped, self.head + kid)
        except InvalidTag:
            raise self._fail("the wrapped data key does not authenticate (header modified)") from None
        self.data_key, self._aead = data_key, _aesgcm(data_key)
        body = os.fstat(self._f.fileno()).st_size - HEADER
        if self.segment <= 0 or body < TAG:
            raise self._fail("truncated encrypted file")
        self.segments = -(-body // (self.segment + TAG))
        self.size = body - self.segments * TAG
        self._segment(self.segments - 1)  # truncation or appending shows here, before any read

    def _segment(self, n: int) -> bytes:
        if self._cached[0] == n:
            return self._cached[1]
        self._f.seek(HEADER + n * (self.segment + TAG))
        sealed = self._f.read(self.segment + TAG)
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, n, n == self.segments - 1), sealed, self.head)
        except self._invalid:
            raise self._fail(
                f"segment {n} does not authenticate (modified, truncated or reordered)"
            ) from None
        self._cached = (n, plain)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def _copy(self, offset: int, view: memoryview) -> int:
        """Decrypt plaintext bytes from `offset` into `view`; returns how many (fewer at the end)."""
        end, done = min(offset + len(view), self.size), 0
        while offset < end:
            seg, within = divmod(offset, self.segment)
            take = min(end - offset, self.segment - within)
            view[done : done + take] = memoryview(self._segment(seg))[within : within + take]
            done, offset = done + take, offset + take
        return done

    def pread(self, offset: int, n: int) -> bytes:
        """`n` plaintext bytes at `offset` (fewer at the end of the file)."""
        out = bytearray(max(0, min(n, self.size - offset)))
        self._copy(offset, memoryview(out))
        return bytes(out)

    def readinto(self, b: Any) -> int:
        n = self._copy(self._pos, memoryview(b).cast("B"))
        self._pos += n
        return n

    def readall(self) -> bytes:
        if self._pos >= self.size:
            return b""
        first, within = divmod(self._pos, self.segment)
        parts = [self._segment(n) for n in range(first, self.segments)]  # one copy: the join
        parts[0] = parts[0][within:]
        self._pos = self.size
        return b"".join(parts)

    def close(self) -> None:
        self._f.close()
        self._cached = (-1, b"")
        super().close()


def open_read(path: Path | str) -> BinaryIO:
    """A binary file for reading: decrypted transparently when `path` is encrypted."""
    if is_encrypted(path):
        return io.BufferedReader(EncryptedReader(path), buffer_size=SEGMENT)
    return open(path, "rb")


def read_bytes(path: Path | str) -> bytes:
    with open_read(path) as f:
        return f.read()


def read_text(path: Path | str) -> str:
    return read_bytes(path).decode("utf-8")


def plain_size(path: Path | str) -> int:
    """The plaintext size of a file (its size when it is not encrypted), without the key."""
    path = Path(path)
    size = path.stat().st_size
    if not is_encrypted(path):
        return size
    with open(path, "rb") as f:
        segment = _HEAD.unpack(f.read(_HEAD.size))[3]
    body = size - HEADER
    return body - -(-body // (segment + TAG)) * TAG if segment > 0 and body >= TAG else -1


@contextmanager
def atomic_writer(path: Path | str, encrypt: bool | None = None) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` (sealed when `encrypt`, by default `encrypting()`) only once
    it is complete and fsynced; an exception leaves the old file, if any, untouched."""
    path = Path(path)
    encrypt = encrypting() if encrypt is None else encrypt
    key = current_key() if encrypt else None  # a plaintext write never reads the key
    if encrypt and key is None:
        raise ConfigError(f"{path}: encrypting needs encryption.key_file or {KEY_ENV}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            if encrypt:
                assert key is not None
                writer = EncryptedWriter(raw, key)
                buffered = io.BufferedWriter(writer, buffer_size=SEGMENT)
                yield buffered
                buffered.close()  # seals the last segment
            else:
                yield raw
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes, encrypt: bool | None = None) -> None:
    with atomic_writer(path, encrypt) as f:
        f.write(data)


def write_text(path: Path | str, text: str, encrypt: bool | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), encrypt)


def write_json(path: Path | str, obj: Any, encrypt: bool | None = None) -> None:
    """JSON with sorted keys and a trailing newline (byte-identical for identical content), sealed when
    encrypting."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encrypt)


def rewrap(path: Path, old: bytes, new: bytes) -> None:
    """Rewrap `path`'s data key under `new` (atomic); the segments are copied as they are."""
    reader = EncryptedReader(path, old)  # checks the old key, the header and the last segment
    try:
        head, data_key = reader.head, reader.data_key
    finally:
        reader.close()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            src.seek(HEADER)
            dst.write(head + _key_block(head, data_key, new))
            while chunk := src.read(SEGMENT):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def transcode(path: Path, encrypt: bool) -> None:
    """Encrypt (with the current key) or decrypt `path` in place, atomically, streaming."""
    with open_read(path) as src, atomic_writer(path, encrypt) as dst:
        while chunk := src.read(SEGMENT):
            dst.write(chunk)


def copy_file(src: Path | str, dst: Path | str) -> None:
    """Copy a file into an output: sealed on the way when encrypting and `src` is plaintext; an encrypted
    `src` is copied as it is (never decrypted into an output by a copy)."""
    if encrypting() and not is_encrypted(src):
        with open(src, "rb") as f, atomic_writer(dst, encrypt=True) as out:
            while chunk := f.read(SEGMENT):
                out.write(chunk)
    else:
        shutil.copyfile(src, dst)
