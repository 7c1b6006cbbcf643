"""Write tests/data/pii_faker_items.json: PII items from Faker, a generator lmforge's authors did not write.

The tests use this fixture as an independent recall check (tests/pii_cases.py is ours, so a detector
tuned to it could still miss real formats). Faker is not an lmforge dependency; run this in the peer
virtualenv of benchmarks/pii_presidio_peer.py after `pip install faker==40.54.0`:

    /tmp/presidio/bin/python benchmarks/pii_faker_fixture.py

Items per kind: 100 per locale x 10 locales (phones: 300 per locale). Faker's 12-digit Maestro numbers
are left out: the masking spec covers 13-19 digit cards. IBANs for en_IN come from pl_PL (see below).
"""

from __future__ import annotations

import json
from pathlib import Path

from faker import Faker

LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "en_IN", "en_CA", "pt_BR")
CARD_TYPES = ("visa13", "visa16", "visa19", "mastercard", "amex", "discover", "diners", "jcb15", "jcb16")
OUT = Path(__file__).resolve().parent.parent / "tests/data/pii_faker_items.json"


def main() -> None:
    items: dict[str, dict[str, list[str]]] = {}
    for i, locale in enumerate(LOCALES):
        fake = Faker(locale)
        fake.seed_instance(1000 + i)
        # Faker's en_IN IBANs are GB-prefixed and one character short of GB's 22: not valid IBANs.
        iban_fake = Faker("pl_PL") if locale == "en_IN" else fake
        iban_fake.seed_instance(1000 + i)
        items[locale] = {
            "email": [fake.email() for _ in range(100)],
            "phone": [fake.phone_number() for _ in range(300)],
            "ip": [fake.ipv4() for _ in range(50)] + [fake.ipv6() for _ in range(50)],
            "credit_card": [fake.credit_card_number(card_type=CARD_TYPES[j % 9]) for j in range(100)],
            "iban": [iban_fake.iban() for _ in range(100)],
        }
    meta = {"faker": __import__("faker").VERSION, "locales": list(LOCALES), "card_types": list(CARD_TYPES)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "items": items}, indent=0, ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
