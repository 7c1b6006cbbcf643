"""Seeded generators of realistic PII items and hard negatives, each embedded in prose.

Used by tests/test_pii.py (recall and false-positive rates) and benchmarks/pii.py (the same data for
lmforge and the peer). Every generator takes a `random.Random` and returns one string; `embed` puts
an item into a sentence.
"""

from __future__ import annotations

import base64
import json
import random
import string
import uuid
from collections.abc import Callable

from lmforge.data.pii import IBAN_LENGTHS

_WORDS = (
    "the", "report", "was", "sent", "to", "our", "team", "last", "week", "and", "everyone", "agreed",
    "that", "the", "numbers", "looked", "better", "than", "expected", "although", "several", "customers",
    "asked", "for", "more", "detail", "about", "the", "plan", "so", "please", "review", "it", "before",
    "friday", "when", "we", "meet", "again", "with", "the", "vendor", "to", "discuss", "pricing",
    "support", "and", "the", "migration", "schedule",
)  # fmt: skip

_TEMPLATES = (
    "{pre} {x} {post}",
    "{pre}: {x}. {post}",
    "{pre} ({x}) {post}",
    "{pre} '{x}', {post}",
    '{pre} "{x}" {post}',
    "{x} {post}",
    "{pre} {x}",
    "{pre}\n{x}\n{post}",
    "{pre} [{x}] {post}",
    "{pre} <{x}> {post}",
)


def prose(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def embed(rng: random.Random, item: str) -> str:
    return rng.choice(_TEMPLATES).format(pre=prose(rng).capitalize(), x=item, post=prose(rng) + ".")


# ------------------------------------------------------------------------------------------ positives
_FIRST = ["john", "maria", "wei", "olga", "ahmed", "li", "sara", "jean-luc", "o.brien", "kim", "ana", "raj"]
_LAST = ["smith", "garcia", "zhang", "ivanova", "khan", "nguyen", "müller", "dupont", "tanaka", "silva"]
_DOMAINS = ["example.com", "mail.example.org", "corp.co.uk", "uni-heidelberg.de", "gmail.com", "x.io",
            "dept.university.edu", "company.museum", "startup.ai", "post.example.fr"]  # fmt: skip


def gen_email(rng: random.Random) -> str:
    first, last = rng.choice(_FIRST), rng.choice(_LAST).replace("ü", "u")
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first}{rng.randint(1, 999)}",
            f"{first[0]}{last}",
            f"{first}_{last}",
            f"{first}+{rng.choice(['news', 'tag', 'x'])}",
            f"{last}.{first}{rng.randint(70, 99)}",
        ]
    )
    domain = rng.choice(_DOMAINS)
    email = f"{local}@{domain}".upper() if rng.random() < 0.05 else f"{local}@{domain}"
    return f"mailto:{email}" if rng.random() < 0.1 else email


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def gen_phone(rng: random.Random) -> str:
    area, ex, line = rng.randint(201, 989), rng.randint(100, 999), _digits(rng, 4)
    fmt = rng.randrange(15)
    if fmt == 12:
        return f"+44 (0)20 {_digits(rng, 4)} {_digits(rng, 4)}"
    if fmt == 13:
        return f"{area} {ex} {line}"
    if fmt == 14:
        return f"+1 {area} {ex} {line}"
    if fmt == 0:
        return f"({area}) {ex}-{line}"
    if fmt == 1:
        return f"{area}-{ex}-{line}"
    if fmt == 2:
        return f"{area}.{ex}.{line}"
    if fmt == 3:
        return f"+1-{area}-{ex}-{line}"
    if fmt == 4:
        return f"+1 ({area}) {ex}-{line}"
    if fmt == 5:
        return f"1-800-{ex}-{line}"
    if fmt == 6:
        return f"+1{area}{ex}{line}"
    if fmt == 7:
        return f"+44 20 {_digits(rng, 4)} {_digits(rng, 4)}"
    if fmt == 8:
        return (
            f"+33 {rng.randint(1, 9)} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)} {_digits(rng, 2)}"
        )
    if fmt == 9:
        return f"+49 {rng.randint(30, 89)} {_digits(rng, rng.randint(6, 8))}"
    if fmt == 10:
        return f"+81 {rng.randint(3, 9)}-{_digits(rng, 4)}-{_digits(rng, 4)}"
    return f"+91 {rng.randint(70000, 99999)} {_digits(rng, 5)}"


def gen_ip(rng: random.Random) -> str:
    import ipaddress

    kind = rng.randrange(7)
    if kind <= 2:
        first = rng.choice([10, 172, 192, 8, 1, 100, 203, rng.randint(1, 223)])
        v4 = ".".join(str(x) for x in (first, rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)))
        return rng.choice([v4, v4, v4, f"{v4}:{rng.randint(1, 65535)}", f"{v4}/{rng.randint(8, 32)}"])
    if kind == 6:
        addr = ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(32)).compressed
        return f"[{addr}]:{rng.randint(1, 65535)}"
    if kind == 3:  # full, upper or lower case
        addr = ipaddress.IPv6Address(rng.getrandbits(128)).exploded
        return addr.upper() if rng.random() < 0.3 else addr
    if kind == 4:  # compressed, typical documentation / link-local prefixes
        prefix = rng.choice([0x20010DB8, 0xFE800000, 0x2A001450, 0x26064700])
        value = (prefix << 96) | rng.getrandbits(rng.choice([16, 32, 48, 64]))
        return ipaddress.IPv6Address(value).compressed
    return f"::ffff:{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


_CARD_PREFIXES: tuple[tuple[str, int], ...] = (
    ("4", 16), ("4", 13), ("51", 16), ("53", 16), ("55", 16), ("2221", 16), ("2720", 16), ("34", 15),
    ("37", 15), ("6011", 16), ("65", 16), ("3530", 16), ("36", 14), ("62", 16), ("4", 19),
)  # fmt: skip


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _format_card(rng: random.Random, number: str) -> str:
    style = rng.randrange(3)
    if style == 0:
        return number
    sep = " " if style == 1 else "-"
    if len(number) == 15:  # Amex 4-6-5
        return sep.join((number[:4], number[4:10], number[10:]))
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def card_number(rng: random.Random) -> str:
    prefix, length = rng.choice(_CARD_PREFIXES)
    partial = prefix + _digits(rng, length - len(prefix) - 1)
    return partial + luhn_digit(partial)


def gen_credit_card(rng: random.Random) -> str:
    return _format_card(rng, card_number(rng))


def _iban_check(country: str, bban: str) -> str:
    value = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{98 - value % 97:02d}"


_IBAN_COUNTRIES = ("DE", "GB", "FR", "ES", "IT", "NL", "BE", "CH", "AT", "PL", "SE", "NO", "PT", "IE", "DK")


def _bban(rng: random.Random, country: str) -> str:
    n = IBAN_LENGTHS[country] - 4
    if country in ("GB", "NL", "IE"):  # bank code letters, then digits
        return "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + _digits(rng, n - 4)
    if country == "IT":
        return rng.choice(string.ascii_uppercase) + _digits(rng, n - 1)
    return _digits(rng, n)


def _format_iban(rng: random.Random, iban: str) -> str:
    return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.5 else iban


def gen_iban(rng: random.Random) -> str:
    country = rng.choice(_IBAN_COUNTRIES)
    bban = _bban(rng, country)
    return _format_iban(rng, country + _iban_check(country, bban) + bban)


_B64 = string.ascii_letters + string.digits + "+/"
_ALNUM = string.ascii_letters + string.digits


def _rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64url(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def gen_secret(rng: random.Random) -> str:
    """A secret as it appears in text; for the generic `key = value` rule only the value is secret."""
    kind = rng.randrange(10)
    if kind == 0:
        return rng.choice(["AKIA", "ASIA"]) + _rand(rng, string.ascii_uppercase + string.digits, 16)
    if kind == 1:
        label = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
        body = "\n".join(_rand(rng, _B64, 64) for _ in range(rng.randint(3, 12)))
        return f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----"
    if kind == 2:
        header = _b64url({"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"})
        payload = _b64url(
            {"sub": _digits(rng, 10), "name": rng.choice(_FIRST), "iat": rng.randint(10**9, 2 * 10**9)}
        )
        sig = _rand(rng, string.ascii_letters + string.digits + "-_", 43)
        return f"{header}.{payload}.{sig}"
    if kind == 3:
        if rng.random() < 0.7:
            return rng.choice(["ghp_", "gho_", "ghs_", "ghu_"]) + _rand(rng, _ALNUM, 36)
        return "github_pat_" + _rand(rng, _ALNUM, 22) + "_" + _rand(rng, _ALNUM, 59)
    if kind == 4:
        return f"xox{rng.choice('abpr')}-{_digits(rng, 12)}-{_digits(rng, 12)}-{_rand(rng, _ALNUM, 24)}"
    if kind == 5:
        return "AIza" + _rand(rng, _ALNUM + "-_", 35)
    if kind == 6:
        return rng.choice(["sk-", "sk-proj-"]) + _rand(rng, _ALNUM, 48)
    if kind == 7:
        return rng.choice(["sk_live_", "rk_live_", "sk_test_"]) + _rand(rng, _ALNUM, rng.randint(24, 99))
    key = rng.choice(
        ["api_key", "API_KEY", "token", "secret", "password", "client_secret", "auth_token", "apiKey",
         "AWS_SECRET_ACCESS_KEY", "db_password", "SLACK_BOT_TOKEN"]
    )  # fmt: skip
    extra = "!@#$%^&*" if "password" in key else "+/" if key.startswith("AWS") else ""
    value = _rand(rng, _ALNUM + extra, rng.randint(12, 40))
    if not any(c.isdigit() for c in value):
        value += str(rng.randint(0, 9))
    sep = rng.choice([" = ", "=", ": ", '": "'])
    if rng.random() < 0.15:
        key = f"export {key}"
        sep = "="
    quote = rng.choice(['"', "'", ""]) if sep != '": "' else ""
    return f"{key}{sep}{quote}{value}{quote}"


def generic_secret_value(item: str) -> str | None:
    """For a generic `key = value` secret item, the value (what must disappear); None for other kinds."""
    for sep in ('": "', " = ", ": ", "="):
        if sep in item and item.split(sep, 1)[0].removeprefix("export ").replace("_", "").isalpha():
            return item.split(sep, 1)[1].strip("\"'")
    return None


def masked_part(kind: str, item: str) -> str:
    """The exact substring of a generated item that masking must replace by the kind's placeholder."""
    if kind == "secret":
        return generic_secret_value(item) or item
    if kind == "email":
        return item.removeprefix("mailto:")
    if kind == "ip":
        if item.startswith("["):  # [v6]:port
            return item[1 : item.index("]")]
        if "." in item and ":" in item and not item.startswith("::"):  # v4:port
            return item.rsplit(":", 1)[0]
        return item.split("/", 1)[0]
    return item


POSITIVES: dict[str, Callable[[random.Random], str]] = {
    "email": gen_email,
    "phone": gen_phone,
    "ip": gen_ip,
    "credit_card": gen_credit_card,
    "iban": gen_iban,
    "secret": gen_secret,
}


# ------------------------------------------------------------------------------------- hard negatives
def neg_card_failing_luhn(rng: random.Random) -> str:
    number = card_number(rng)
    wrong = str((int(number[-1]) + rng.randint(1, 9)) % 10)
    return _format_card(rng, number[:-1] + wrong)


def neg_iban_failing_mod97(rng: random.Random) -> str:
    country = rng.choice(_IBAN_COUNTRIES)
    bban = _bban(rng, country)
    good = int(_iban_check(country, bban))
    bad = (good + rng.randint(1, 96)) % 97
    bad = bad if bad >= 2 else bad + 2  # 00/01 are never issued; keep the string plausible
    if bad == good:
        bad = good + 1 if good < 98 else good - 1
    return _format_iban(rng, f"{country}{bad:02d}{bban}")


def neg_version(rng: random.Random) -> str:
    a, b, c, d = rng.randint(0, 20), rng.randint(0, 30), rng.randint(0, 99), rng.randint(0, 255)
    return rng.choice(
        [
            f"version {a}.{b}.{c}.{d}",
            f"v{a}.{b}.{c}.{d}",
            f"Version: {a}.{b}.{c}",
            f"{a}.{b}.{c}",
            f"10.0.{rng.randint(10000, 22631)}.{rng.randint(100, 4000)}",
            f"Chrome {rng.randint(90, 130)}.0.{rng.randint(4000, 6999)}.{rng.randint(10, 250)}",
            f"mylib=={a}.{b}.{c}.{d}",
            f"{a}.{b}.{c}.{d}-rc{rng.randint(1, 5)}",
            f"release {a}.{b}.{c}.{d}",
            f"build {a}.{b}.{c}.{d}",
            f"libfoo-{a}.{b}.{c}.{d}.tar.gz",
            f"firmware {a}.{b}.{c}.{d}",
        ]
    )


def neg_timestamp(rng: random.Random) -> str:
    y, mo, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    h, mi, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
    return rng.choice(
        [
            f"{y}-{mo:02d}-{d:02d}",
            f"{y}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}Z",
            f"{y}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}.{rng.randint(0, 999999):06d}",
            f"{y}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}+{rng.randint(0, 12):02d}:{rng.choice([0, 30]):02d}",
            f"{d:02d}/{mo:02d}/{y}",
            f"{mo:02d}-{d:02d}-{y}",
            f"{d:02d}.{mo:02d}.{y} {h:02d}:{mi:02d}",
            f"{h:02d}:{mi:02d}:{s:02d}",
            f"{y}{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}",
            str(rng.randint(10**9, 2 * 10**9)),
            str(rng.randint(10**12, 2 * 10**12)),
            f"[{y}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d},{rng.randint(0, 999):03d}]",
        ]
    )


def neg_hex_hash(rng: random.Random) -> str:
    digest = _rand(rng, "0123456789abcdef", rng.choice([40, 64]))
    if rng.random() < 0.2:
        digest = digest.upper()
    return rng.choice([digest, f"commit {digest}", f"sha256:{digest}", f"sha1 {digest}", f"@{digest[:40]}"])


def neg_uuid(rng: random.Random) -> str:
    u = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return u.upper() if rng.random() < 0.2 else u


def neg_long_number(rng: random.Random) -> str:
    """Numbers that are not cards or phones: counts, IDs, ISBN-13, timestamps, grouped thousands."""
    return rng.choice(
        [
            str(rng.randint(10**4, 10**12)),
            f"{rng.randint(10**6, 10**12):,}",
            f"ISBN 978{_digits(rng, 10)}",
            f"order #{rng.randint(10**7, 10**11)}",
            str(rng.randint(10**18, 2 * 10**18)),
            f"{rng.randint(1, 999):,}.{_digits(rng, rng.randint(1, 6))}",
            f"{_digits(rng, 3)} {_digits(rng, 3)} {_digits(rng, 3)}",
            f"{rng.randint(1, 9)}{_digits(rng, rng.randint(20, 40))}",
        ]
    )


def neg_price(rng: random.Random) -> str:
    v = rng.randint(0, 10**7)
    cents = rng.randint(0, 99)
    return rng.choice(
        [
            f"${v:,}.{cents:02d}",
            f"€{v:,}".replace(",", ".") + f",{cents:02d}",
            f"USD {v}.{cents:02d}",
            f"£{v}",
            f"{v:,} EUR",
            f"+{rng.randint(1, 99)}.{cents:02d}%",
            f"-{v}.{cents:02d}",
            f"${v / 100:.2f} - ${v / 50:.2f}",
        ]
    )


def neg_misc(rng: random.Random) -> str:
    """Other look-alikes: MAC addresses, C++ paths, hex colours, ranges, coordinates, math."""
    return rng.choice(
        [
            ":".join(f"{rng.randint(0, 255):02X}" for _ in range(6)),
            f"std::vector<int> and {rng.choice(['Foo', 'ns'])}::{rng.choice(['bar', 'Baz'])}()",
            f"#{_rand(rng, '0123456789abcdef', 6)}",
            f"pages {rng.randint(1, 500)}-{rng.randint(501, 999)}",
            f"{rng.uniform(-90, 90):.4f}, {rng.uniform(-180, 180):.4f}",
            f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = {rng.randint(2, 198)}",
            f"token = tokenizer.encode(text{rng.randint(0, 9)})",
            f"password = getpass.getpass()  # line {rng.randint(1, 999)}",
            f"sk-learn-compatible-estimator-{rng.randint(1, 9)}",
            f"{rng.randint(100, 999)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
        ]
    )


NEGATIVES: dict[str, Callable[[random.Random], str]] = {
    "card_failing_luhn": neg_card_failing_luhn,
    "iban_failing_mod97": neg_iban_failing_mod97,
    "version_string": neg_version,
    "timestamp_date": neg_timestamp,
    "hex_hash": neg_hex_hash,
    "uuid": neg_uuid,
    "long_number": neg_long_number,
    "price": neg_price,
    "misc_lookalike": neg_misc,
}


def random_card_length_number(rng: random.Random) -> str:
    """Uniformly random 16-digit strings: about 2.5% are valid cards by issuer prefix + Luhn."""
    return _digits(rng, 16)
