"""Peer side of benchmarks/pii.py: Microsoft Presidio's pattern recognizers on the same documents.

Runs in its own virtualenv (presidio pulls spaCy; lmforge does not need it):

    python3 -m venv /tmp/presidio && /tmp/presidio/bin/pip install presidio-analyzer==2.2.366
    /tmp/presidio/bin/python benchmarks/pii_presidio_peer.py IN.json OUT.json

IN.json is {"sets": {name: [doc, ...]}, "timed": [name, ...]}; OUT.json gets, per set, a list of
[start, end, entity, score] spans per document and the seconds spent in `analyze` for timed sets. No
spaCy model can be downloaded here, so the NLP engine is a no-op: the recognizers used (email, phone via
`phonenumbers`, IP, credit card with Luhn, IBAN with mod-97) are all pattern/validator based anyway.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine
from presidio_analyzer.predefined_recognizers import (
    CreditCardRecognizer,
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
    PhoneRecognizer,
)


class NoNlp(NlpEngine):  # type: ignore[misc]
    """Empty NLP artifacts: the pattern recognizers do not use them."""

    def load(self) -> None:
        pass

    def is_loaded(self) -> bool:
        return True

    def process_text(self, text: str, language: str) -> NlpArtifacts:
        return NlpArtifacts(
            entities=[], tokens=[], tokens_indices=[], lemmas=[], nlp_engine=self, language=language
        )

    def process_batch(
        self, texts: Any, language: str, batch_size: int = 1, n_process: int = 1, **kw: Any
    ) -> Iterator[Any]:
        for t in texts:
            yield t, self.process_text(t, language)

    def is_stopword(self, word: str, language: str) -> bool:
        return False

    def is_punct(self, word: str, language: str) -> bool:
        return False

    def get_supported_entities(self) -> list[str]:
        return []

    def get_supported_languages(self) -> list[str]:
        return ["en"]


def main() -> None:
    logging.disable(logging.CRITICAL)  # tldextract logs a failed public-suffix download (no network)
    with open(sys.argv[1], encoding="utf-8") as f:
        data = json.load(f)
    registry = RecognizerRegistry(supported_languages=["en"])
    for rec in (
        EmailRecognizer(),
        PhoneRecognizer(),
        IpRecognizer(),
        CreditCardRecognizer(),
        IbanRecognizer(),
    ):
        registry.add_recognizer(rec)
    engine = AnalyzerEngine(nlp_engine=NoNlp(), registry=registry, supported_languages=["en"])
    engine.analyze("warm up jo@example.org 4111 1111 1111 1111", language="en")
    out: dict[str, Any] = {"spans": {}, "seconds": {}}
    for name, docs in data["sets"].items():
        start = time.process_time()
        spans = [
            [[r.start, r.end, r.entity_type, r.score] for r in engine.analyze(doc, language="en")]
            for doc in docs
        ]
        out["seconds"][name] = time.process_time() - start
        out["spans"][name] = spans
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
