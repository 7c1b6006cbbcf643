"""What a browser may ask of `lmforge serve`: the Host allowlist, the Origin check, the JSON content type.

A server without keys on loopback is still reachable from every web page its user opens: a page can POST
to http://127.0.0.1:8000 (CSRF; `text/plain` JSON needs no CORS preflight) and, by DNS rebinding
(evil.example resolving to 127.0.0.1), read the answers. So, on every route and with or without keys:

- `Host` must name this server: localhost, 127.0.0.1 or [::1] (any port), the bound host unless it is a
  wildcard (0.0.0.0, ::), or one of `allowed_hosts` (`*` = any). Else 421: a rebound name never matches.
- `Origin`, when sent (browsers send it on cross-origin requests and on every POST), must be this
  server's own origin (same host and port as `Host`: the chat page served at /) or one of
  `allowed_origins` (`*` = any). No `Origin` = not a browser's cross-site request = allowed. Else 403.
- A JSON body must say so: `application/json` or `*/*+json` (parameters such as charset allowed). Else 415,
  which also makes every cross-site POST need a CORS preflight that this server never grants.
"""

from __future__ import annotations

from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("", "0.0.0.0", "::", "*")
DEFAULT_PORTS = {"http": 80, "https": 443}


def allowed_host_names(bound: str, extra: list[str]) -> frozenset[str]:
    """The names a request's Host may carry (lowercase, without port or brackets)."""
    names = {*LOOPBACK_NAMES, *(h.strip().strip("[]").lower() for h in extra)}
    bound = bound.strip().strip("[]").lower()
    if bound not in WILDCARDS:
        names.add(bound)
    return frozenset(names)


def split_host(value: str, scheme: str = "http") -> tuple[str, int] | None:
    """("name", port) of a Host header or an origin's netloc; None when malformed."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@ \t"):
        return None
    if value.startswith("["):  # [::1]:8000
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        name, _, port_text = value.partition(":") if value.count(":") <= 1 else ("", "", "")
    if not name:
        return None
    if not port_text:
        return name, DEFAULT_PORTS.get(scheme, 80)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return name, int(port_text)


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    if "*" in names:
        return True
    parsed = split_host(host or "")
    return parsed is not None and parsed[0] in names


def origin_allowed(origin: str | None, host: str | None, scheme: str, allowed: list[str]) -> bool:
    """No Origin, this server's own origin, or a listed one (compared as scheme://host:port)."""
    if origin is None:
        return True
    if "*" in allowed:
        return True
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in DEFAULT_PORTS or parts.path or parts.query:  # "null", file://, junk
        return False
    own = split_host(parts.netloc, parts.scheme)
    if own is None:
        return False
    listed = {split_origin(o) for o in allowed}
    return (parts.scheme, *own) in listed or own == split_host(host or "", scheme)


def split_origin(origin: str) -> tuple[str, str, int] | None:
    parts = urlsplit(origin.strip().lower())
    own = split_host(parts.netloc, parts.scheme)
    return None if own is None else (parts.scheme, *own)


def is_json_type(content_type: str | None) -> bool:
    """`application/json` or `*/*+json`, with any parameters (`; charset=utf-8`)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    kind, sep, sub = media.partition("/")
    return media == "application/json" or (bool(sep and kind) and len(sub) > 5 and sub.endswith("+json"))


__all__ = [
    "LOOPBACK_NAMES",
    "allowed_host_names",
    "host_allowed",
    "is_json_type",
    "origin_allowed",
    "split_host",
    "split_origin",
]
