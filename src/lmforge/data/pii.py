"""PII masking: replace personal data and secrets in text with typed placeholders, counting each kind.

`mask_pii(text)` returns the masked text and a count per kind. Kinds and their placeholders:

    email        <EMAIL>         local@domain.tld
    phone        <PHONE>         +44 20 7946 0958, +15551234567, 0044 20 7946 0958, (555) 123-4567, 555-123-4567,
                                 1-800-555-0199 x12, and national shapes such as (0113) 496 0277 or 03 10 44 34 60
                                 (bare digit strings like 0160855857 are left alone: they look like any ID)
    ip           <IP>            IPv4 (octets <= 255, not in a version-string context) and IPv6 (via `ipaddress`)
    credit_card  <CREDIT_CARD>   13-19 digits, spaces/dashes allowed, Luhn-valid with a real issuer prefix
    iban         <IBAN>          country code + check digits, per-country length, ISO 13616 mod-97 check
    secret       <SECRET>        AWS key ids, PEM private-key blocks, JWTs, GitHub/Slack/Google/OpenAI/Stripe
                                 tokens, and the value of `api_key|token|secret|password = "<random-looking>"`

Every pattern is compiled once at import; each rule runs only when a cheap substring/char test says it
can match, so prose without digits, '@' or token prefixes costs a few C-level scans. Regexes find
candidates and a Python check validates them (Luhn, mod-97, `ipaddress`, base64url JSON header), which is
what keeps dates, version strings, timestamps, hex hashes and plain long numbers unmasked.
Masking repeats until nothing more matches, so `mask_pii(mask_pii(t)[0])[0] == mask_pii(t)[0]`.
User guide with the measured recall, false-positive rates and speed: docs/data-pii.md.

    >>> from lmforge.data.pii import mask_pii
    >>> mask_pii("Mail jo@example.org or call +44 20 7946 0958.")
    ('Mail <EMAIL> or call <PHONE>.', {'email': 1, 'phone': 1, 'ip': 0, 'credit_card': 0, 'iban': 0, 'secret': 0})
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Collection

from lmforge.errors import ConfigError

PII_KINDS: tuple[str, ...] = ("email", "phone", "ip", "credit_card", "iban", "secret")
PLACEHOLDERS: dict[str, str] = {kind: f"<{kind.upper()}>" for kind in PII_KINDS}

# Order matters: secrets first (a JWT or key block must not be half-eaten by the digit rules), then
# email, then the digit-based kinds from the most to the least validated.
_ORDER: tuple[str, ...] = ("secret", "email", "iban", "credit_card", "phone", "ip")

# ----------------------------------------------------------------------------------------------- email
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)

# ----------------------------------------------------------------------------------------- credit card
# A candidate is a run of digit groups joined by single spaces or dashes; `is_card_number` decides.
# Patterns open with a plain `\d` and check the character before it by a lookbehind placed after it:
# the regex engine then jumps from digit to digit instead of trying the lookbehind at every position.
_CARD_CANDIDATE = re.compile(r"\d(?<![\w+.,/:-]\d)\d{1,18}(?:[ -]\d{1,19}){0,9}(?![\w]|[.,/:-]\d)")

# (prefix range low, high, allowed lengths): the major issuers' IIN ranges. Requiring one of them
# (on top of Luhn) cuts matches on random 16-digit numbers from 10% to about 2.5%.
_ISSUERS: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({13, 16, 19})),  # Visa
    (51, 55, frozenset({16})),  # Mastercard
    (2221, 2720, frozenset({16})),  # Mastercard 2-series
    (34, 34, frozenset({15})),  # American Express
    (37, 37, frozenset({15})),
    (6011, 6011, frozenset(range(16, 20))),  # Discover
    (644, 649, frozenset(range(16, 20))),
    (65, 65, frozenset(range(16, 20))),
    (35, 35, frozenset(range(16, 20))),  # JCB (3528-3589 issued; test generators use all of 35xx)
    (1800, 1800, frozenset({15})),  # JCB (legacy 15-digit)
    (2131, 2131, frozenset({15})),
    (300, 305, frozenset(range(14, 20))),  # Diners Club
    (36, 36, frozenset(range(14, 20))),
    (38, 39, frozenset(range(14, 20))),
    (62, 62, frozenset(range(16, 20))),  # UnionPay
    (2200, 2204, frozenset(range(16, 20))),  # Mir
    (5018, 5018, frozenset(range(13, 20))),  # Maestro
    (5020, 5020, frozenset(range(13, 20))),
    (5038, 5038, frozenset(range(13, 20))),
    (5893, 5893, frozenset(range(13, 20))),
    (6304, 6304, frozenset(range(13, 20))),
    (6759, 6759, frozenset(range(13, 20))),
    (6761, 6763, frozenset(range(13, 20))),
)


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) checksum that every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _issuer_ok(digits: str) -> bool:
    n = len(digits)
    for low, high, lengths in _ISSUERS:
        width = len(str(low))
        if n in lengths and low <= int(digits[:width]) <= high:
            return True
    return False


def is_card_number(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _issuer_ok(digits) and luhn_ok(digits)


# Text ending in an IBAN head ("SE40 "): digits after it belong to an IBAN, valid or not.
_IBAN_HEAD_BEFORE = re.compile(r"[A-Z]{2}\d{2}[ ]?(?:[A-Z0-9]{4} )*$")


def _inside_iban(m: re.Match[str]) -> bool:
    return _IBAN_HEAD_BEFORE.search(m.string, max(0, m.start() - 40), m.start()) is not None


def _mask_cards(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        # The whole run of groups must be the card: a valid 16 digits inside a longer run (a 19-digit
        # number, an account number) is a coincidence 1 time in 40, not a card.
        s = m.group(0)
        digits = s.replace(" ", "").replace("-", "")
        if not is_card_number(digits) or _inside_iban(m):
            return s
        counts["credit_card"] += 1
        return PLACEHOLDERS["credit_card"]

    return _CARD_CANDIDATE.sub(repl, text)


# ------------------------------------------------------------------------------------------------ IBAN
# ISO 13616 registry lengths (SWIFT IBAN registry).
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip
# Printed IBANs are upper case, optionally in groups of four separated by single spaces.
_IBAN_CANDIDATE = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]){11,30}(?![a-z0-9])")


def iban_ok(iban: str) -> bool:
    """Country length and the ISO 7064 mod-97 check of a compact, upper-case IBAN."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _mask_ibans(text: str, counts: Counter[str]) -> str:
    def repl(m: re.Match[str]) -> str:
        s = m.group(0)
        length = IBAN_LENGTHS.get(s[:2])
        if length is None:
            return s
        # The candidate may run into following upper-case words: keep exactly `length` characters.
        taken, end = 0, 0
        while end < len(s) and taken < length:
            taken += s[end] != " "
            end += 1
        if taken < length or (end < len(s) and s[end] != " ") or not iban_ok(s[:end].replace(" ", "")):
            return s
        counts["iban"] += 1
        return PLACEHOLDERS["iban"] + s[end:]

    return _IBAN_CANDIDATE.sub(repl, text)


# ----------------------------------------------------------------------------------------------- phone
# International: '+' or '00', a country code (never 0), then 8-15 digits in all, with single separators
# (space . - or parentheses around a group) and an optional extension; `_phone_intl_ok` checks the grouping.
_EXT = r"(?:[ ]?(?:x|ext\.?|#)[ ]?\d{1,6})?"
_PHONE_INTL = re.compile(
    r"(?:\+(?<![\w+]\+)|0(?<![\w+.-]0)(?<!\d 0)0)[1-9](?:[ .-]?(?:\(\d{1,4}\)|\d)){7,14}"
    + _EXT
    + r"(?![\w]|[.-]\d)"
)
_PHONE_SEP = re.compile(r"[ .\-()]+")
_PHONE_EXT = re.compile(r"[ ]?(?:x|ext\.?|#)[ ]?\d{1,6}$")
# North American with separators: [+1 / 1 / 001] (NPA) NXX-XXXX [x123]; plain 10-digit runs are not
# phone numbers here (they are as often IDs or counts).
_PHONE_NANP = re.compile(
    r"(?<![\w.+/:-])(?:(?:\+?1|001)[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}(?P<s1>[ .-]))\d{3}(?P<s2>[ .-])\d{4}"
    + _EXT
    + r"(?![\w]|[.:/-]\d)"
)
_NANP_QUICK = re.compile(r"\d{3}[ .-]\d{4}")  # cheap test before the full pattern
# National formats (no country code) in the shapes that rarely mean anything else: "(0113) 496 0277",
# "(020)74960774", "(0792)-605892" (area code with trunk 0 in parentheses), "03 10 44 34 60" (French
# pairs), "07209 824722", "0707-972683", "030/123456", "0113 496 0281" (trunk 0, area code, separated
# subscriber number) and "11 98765-4321" (Brazil). Unseparated national numbers are not matched.
_PHONE_NATIONAL = re.compile(
    r"(?:\((?<!\w\()0\d{1,4}\)[ -]?\d{2,4}(?:[ -]?\d{2,4}){0,2}"
    r"|0(?<![\w.+/:,-]0)(?<!\d[ /.-]0)(?:[1-9](?:[ .]\d{2}){4}|\d{2,4}[ /-]\d{5,8}|\d{2,4} \d{3,4} \d{4}|\d{4} \d{3} \d{3})"
    r"|(?:\((?<!\w\()[1-9]\d\) ?|[1-9](?<![\w.+/:,-][1-9])(?<!\d[ /.-][1-9])\d )(?:9\d{4}|\d{4})-\d{4})"
    r"(?![\w]|[.,:/-]\d)"
)


def _phone_intl_ok(s: str) -> bool:
    """Digit count and grouping of a '+'/'00' number; rejects signed decimals such as +35236450.6."""
    s = _PHONE_EXT.sub("", s)
    groups = [g for g in _PHONE_SEP.split(s[1:]) if g]
    digits = sum(map(len, groups))
    if len(groups) == 1:  # compact E.164: short signed integers are more often plain numbers
        return s[0] == "+" and 10 <= digits <= 15
    if not 8 <= digits <= 15 or len(groups[-1]) < 2:  # "+35236450.6" is a signed decimal
        return False
    # A dot-only number ("+1.5") needs 3+ groups to be a phone number, not a decimal; so does '00...'.
    return len(groups) >= 3 or (s[0] == "+" and any(c in s for c in " -("))


def _mask_phones(text: str, counts: Counter[str]) -> str:
    def intl(m: re.Match[str]) -> str:
        if not _phone_intl_ok(m.group(0)) or _inside_iban(m):
            return m.group(0)
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    def nanp(m: re.Match[str]) -> str:
        # Mixed separators ("555.123-4567") are rare in phone numbers and common in other codes.
        if len({m.group("s1"), m.group("s2")} & {".", "-"}) > 1 or _inside_iban(m):
            return m.group(0)
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    if "+" in text or "00" in text:
        text = _PHONE_INTL.sub(intl, text)

    def national(m: re.Match[str]) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        if not 9 <= digits <= 12 or _inside_iban(m):
            return m.group(0)
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    if _NANP_QUICK.search(text):
        text = _PHONE_NANP.sub(nanp, text)
    return _PHONE_NATIONAL.sub(national, text)


# -------------------------------------------------------------------------------------------------- IP
_IPV4 = re.compile(r"\d(?<![\w.-]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?![\w-]|\.\d)")
# Words or marks right before a dotted quad that make it a version/build number, not an address.
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:v|ver|version|versions|release|rel|build|rev|revision|update|firmware|fw|kernel|driver|"
    r"bios|patch|tag|pkg|package|sdk|api|os|edition)\s*[:#]?\s*|[=@~^]\s*|[vV])$",
    re.IGNORECASE,
)
_VERSION_AFTER = re.compile(r"^(?:[-+~](?:rc|alpha|beta|dev|post|pre|b|a|r|build|snapshot)|-\d|\+\w)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%\w+)?(?![\w:]|\.\d)"
)
# Cheap test for the IPv6 pass: "::" or three hex groups in a row (prose has many colons, few of these).
_V6_QUICK = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f:]")


def _mask_ips(text: str, counts: Counter[str]) -> str:
    def v4(m: re.Match[str]) -> str:
        s = m.group(0)
        if any(int(part) > 255 or (len(part) > 1 and part[0] == "0") for part in s.split(".")):
            return s
        start, end = m.span()
        if _VERSION_BEFORE.search(m.string, max(0, start - 24), start) or _VERSION_AFTER.match(
            m.string[end : end + 12]
        ):
            return s
        counts["ip"] += 1
        return PLACEHOLDERS["ip"]

    def v6(m: re.Match[str]) -> str:
        s = m.group(0)
        # Skip C++/Rust paths ("a::b"), times and MACs: need 2+ hex groups with a digit, and a real parse.
        groups = [g for g in re.split(r"[:%]", s) if g]
        if len(groups) < 2 or not any(c.isdigit() for c in s):
            return s
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            return s
        counts["ip"] += 1
        return PLACEHOLDERS["ip"]

    # IPv6 first: "::ffff:192.0.2.1" is one address, not a prefix and an IPv4 one.
    if "::" in text or (text.count(":") >= 7 and _V6_QUICK.search(text)):
        text = _IPV6.sub(v6, text)
    return _IPV4.sub(v4, text) if "." in text else text


# ---------------------------------------------------------------------------------------------- secret
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
# A block cut off before its END line: the header and base64 lines that follow BEGIN.
_PEM_BODY = re.compile(r"(?:\r?\n\s*(?:[A-Za-z0-9+/=]{4,}(?=\r?\n|$)|[A-Za-z-]+: [^\n]*))*")
_PEM_MAX = 16384  # characters from BEGIN to END; real keys are a few KB


def _mask_private_keys(text: str, counts: Counter[str]) -> str:
    """BEGIN ... END blocks. END markers are searched forward once (not once per BEGIN), so many
    unterminated BEGIN lines cost linear time; an END after the next BEGIN belongs to that one."""
    begins = list(_PEM_BEGIN.finditer(text))
    parts: list[str] = []
    pos = 0
    end: re.Match[str] | None = None
    no_more_ends = False
    for i, begin in enumerate(begins):
        if begin.start() < pos:
            continue
        if end is not None and end.start() < begin.end():
            end = None
        if end is None and not no_more_ends:
            end = _PEM_END.search(text, begin.end())
            no_more_ends = end is None
        following = begins[i + 1].start() if i + 1 < len(begins) else len(text)
        if end is not None and end.start() < following and end.end() - begin.start() <= _PEM_MAX:
            stop = end.end()
        else:
            body = _PEM_BODY.match(text, begin.end())
            stop = body.end() if body else begin.end()
        counts["secret"] += 1
        parts += [text[pos : begin.start()], PLACEHOLDERS["secret"]]
        pos = stop
    return "".join(parts) + text[pos:] if parts else text


_JWT = re.compile(r"e(?<![\w-]e)yJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*(?![\w-])")
# Fixed-format tokens: (substring that must occur in the text, pattern).
_TOKEN_RULES: tuple[tuple[tuple[str, ...], re.Pattern[str]], ...] = (
    (("AKIA", "ASIA"), re.compile(r"A(?<![A-Za-z0-9]A)(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
    (
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        re.compile(r"g(?<![A-Za-z0-9_]g)h[pousr]_[A-Za-z0-9]{30,255}(?![A-Za-z0-9_])"),
    ),
    (("github_pat_",), re.compile(r"g(?<![A-Za-z0-9_]g)ithub_pat_[A-Za-z0-9_]{22,255}(?![A-Za-z0-9_])")),
    (("xox",), re.compile(r"x(?<![A-Za-z0-9]x)ox[abposr]-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])")),
    (("AIza",), re.compile(r"A(?<![A-Za-z0-9_-]A)Iza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])")),
    (("_live_", "_test_"), re.compile(r"[sr](?<![A-Za-z0-9][sr])k_(?:live|test)_[A-Za-z0-9]{16,247}\b")),
)
# OpenAI-style keys: checked for a mix of cases and digits so "sk-learn-compatible-estimators" survives.
_SK_DASH = re.compile(
    r"s(?<![A-Za-z0-9_-]s)k-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,250}(?![A-Za-z0-9_-])"
)
# Generic `name = value` credentials. Scanning for the operator first (a single-character class, which
# the regex engine skips to quickly) and only then looking back for the key word is several times
# faster on prose than a case-insensitive keyword alternation.
# The value sits in a lookahead so that a ':' earlier in the line ("Note: api_key=...") cannot swallow it.
_ASSIGN = re.compile(r"(?:=>|:=|[:=])(?=[ \t]*[\"']?([A-Za-z0-9_\-+/=.~!@#$%^&*]{8,256}))")
_KEY_BEFORE = re.compile(
    r"(?:api[_-]?key|apikey|access[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|token|secret|"
    r"client[_-]?secret|password|passwd|pwd)(?:[_-][a-z0-9]+)*[\"']?[ \t]*$"
)
_DIGIT = re.compile(r"\d")
_GENERIC_KEYWORDS: tuple[str, ...] = ("key", "token", "secret", "passw", "pwd")
_SECRET_PREFIXES: tuple[str, ...] = ("-----BEGIN", "eyJ", "sk-", *(p for ps, _ in _TOKEN_RULES for p in ps))


def shannon_entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def looks_random(value: str) -> bool:
    """High-entropy credential-like string: letters and digits mixed, many distinct characters."""
    value = value.strip("\"'.,;")
    if len(value) < 8:
        return False
    has_digit = any(c.isdigit() for c in value)
    has_lower = any(c.islower() for c in value)
    has_upper = any(c.isupper() for c in value)
    if not has_digit and not (has_lower and has_upper and len(value) >= 16):
        return False
    if not (has_lower or has_upper):
        return False  # numbers, dates and versions are not credentials
    # Random strings repeat characters too: a random 12-char base62 value averages ~3.3 bits, min ~2.8.
    return shannon_entropy(value) >= min(3.0, math.log2(len(value)) - 0.8)


def _mixed_case_digits(value: str) -> bool:
    """Random base62 of 20+ characters has upper, lower and digits; hyphenated words do not."""
    return (
        any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and any(c.isdigit() for c in value)
        and looks_random(value)
    )


def _jwt_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        return isinstance(json.loads(decoded), dict)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False


def _mask_secrets(text: str, counts: Counter[str]) -> str:
    ph = PLACEHOLDERS["secret"]

    def whole(m: re.Match[str]) -> str:
        counts["secret"] += 1
        return ph

    if "-----BEGIN" in text:
        text = _mask_private_keys(text, counts)
    if "eyJ" in text:
        text = _JWT.sub(lambda m: whole(m) if _jwt_ok(m.group(0)) else m.group(0), text)
    for needles, pattern in _TOKEN_RULES:
        if any(n in text for n in needles):
            text = pattern.sub(whole, text)
    if "sk-" in text:
        text = _SK_DASH.sub(lambda m: whole(m) if _mixed_case_digits(m.group(0)[3:]) else m.group(0), text)
    lowered = text.lower()
    if any(k in lowered for k in _GENERIC_KEYWORDS):
        parts, pos = [], 0
        for m in _ASSIGN.finditer(text):
            value = m.group(1).rstrip(".,;")
            start = m.start(1)
            end = start + len(value)
            if (
                start < pos
                # bare code names like Mgr.find_user: a digit-free value must be a quoted literal
                or not (text[start - 1 : start] in "\"'" or _DIGIT.search(value))
                or not _KEY_BEFORE.search(lowered, max(0, m.start() - 48), m.start())
                or not looks_random(value)
                or text[end : end + 1] == "("  # a function call, not a literal
            ):
                continue
            counts["secret"] += 1
            parts += [text[pos:start], ph]
            pos = end
        if parts:
            text = "".join(parts) + text[pos:]
    return text


def _mask_emails(text: str, counts: Counter[str]) -> str:
    if "@" not in text:
        return text

    def repl(m: re.Match[str]) -> str:
        counts["email"] += 1
        return PLACEHOLDERS["email"]

    return _EMAIL.sub(repl, text)


def _has_digit_run(text: str) -> bool:
    return any(c in text for c in "0123456789")


_MASKERS: dict[str, Callable[[str, Counter[str]], str]] = {
    "secret": _mask_secrets,
    "email": _mask_emails,
    "iban": _mask_ibans,
    "credit_card": _mask_cards,
    "phone": _mask_phones,
    "ip": _mask_ips,
}
_NEEDS_DIGIT = frozenset({"iban", "credit_card", "phone", "ip"})


def check_kinds(kinds: Collection[str] | None) -> tuple[str, ...]:
    """The requested kinds in masking order; unknown names raise ConfigError listing the valid ones."""
    if kinds is None:
        return _ORDER
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = sorted(set(kinds) - set(PII_KINDS))
    if unknown:
        raise ConfigError(f"unknown PII kind(s) {', '.join(unknown)}; valid kinds: {', '.join(PII_KINDS)}")
    return tuple(k for k in _ORDER if k in kinds)


def mask_pii(text: str, kinds: Collection[str] | None = None) -> tuple[str, dict[str, int]]:
    """Mask `kinds` (default: all of PII_KINDS) in `text`.

    Returns (masked text, counts) where counts has every requested kind, in PII_KINDS order, with 0 for
    kinds not found, so per-document counts can be summed without key checks.
    """
    order = check_kinds(kinds)
    counts: Counter[str] = Counter()
    while True:  # until a pass changes nothing; each match shrinks the unmasked text, so this ends
        before = sum(counts.values())
        has_digit = _has_digit_run(text)
        for kind in order:
            if kind in _NEEDS_DIGIT and not has_digit:
                continue
            text = _MASKERS[kind](text, counts)
        if sum(counts.values()) == before:
            break
    return text, {k: counts[k] for k in PII_KINDS if k in order}
