"""API keys for `lmforge serve`: where they come from, how a request's key is checked, how logs name it.

Keys come from an environment variable (comma-separated, `LMFORGE_API_KEYS` by default) and/or a file
(one key per line, `#` comments). A request sends `Authorization: Bearer <key>`; the scheme is
case-insensitive (RFC 7235), the key is not. Every configured key is compared with `hmac.compare_digest`,
always all of them, so the time taken says nothing about which key, or how much of one, matched.
Logs carry a key's fingerprint (a SHA-256 prefix), never the key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.io import read_lines

MIN_KEY_LENGTH = 8


def load_keys(env_var: str | None = "LMFORGE_API_KEYS", path: Path | str | None = None) -> list[str]:
    """The configured keys (env var first, then the file), without duplicates; [] means no auth."""
    keys: list[str] = []
    if env_var:
        keys += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
    if path is not None:
        for n, line in read_lines(path, "api_keys_file (one key per line)", error=ConfigError):
            if any(c.isspace() for c in line) or "," in line:
                raise ConfigError(f"{path}:{n}: a key may not contain spaces or commas")
            keys.append(line)
    for k in keys:
        if len(k) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"API key {fingerprint(k)} is {len(k)} characters; use at least {MIN_KEY_LENGTH} "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    return list(dict.fromkeys(keys))


def fingerprint(key: str) -> str:
    """What logs and audit records show of a key: 16 hex digits of its SHA-256 (not reversible; 64 bits tell
    keys apart with no realistic collision). `printf %s KEY | sha256sum | cut -c1-16` gives the same."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme in any case), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


def match_key(header: str | None, keys: list[str]) -> str | None:
    """The configured key the header carries, or None. Compares against every key, in constant time each."""
    token = bearer_token(header)
    if token is None:
        return None
    # Digests have one length, so not even a key's length leaks through the comparison's timing.
    given = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
    found = None
    for key in keys:
        if hmac.compare_digest(given, hashlib.sha256(key.encode("utf-8")).digest()):  # no early exit
            found = key
    return found


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: list[str]) -> None:
    """Refuse to listen beyond this machine without keys: an open model endpoint is anyone's free GPU."""
    if not keys and not is_loopback(host):
        raise ConfigError(
            f"host={host} is reachable from other machines and no API keys are set: set LMFORGE_API_KEYS "
            "or api_keys_file, or bind host=127.0.0.1"
        )
