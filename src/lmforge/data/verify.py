"""`lmforge data verify`: check stage outputs against their SHA-256 manifests (the library is manifest.py).

lmforge data verify runs/demo/curated runs/demo/tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.data.manifest import verify_manifest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lmforge data verify",
        description="Check every file listed in DIR/manifest.json against its size and SHA-256. "
        "Exit 0 if all match, 3 naming each missing, truncated or changed file otherwise.",
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="output directory of an lmforge stage")
    args = p.parse_args(argv)
    for d in args.dirs:
        m = verify_manifest(d)
        total = sum(int(f["bytes"]) for f in m["files"].values())
        print(f"ok {d}: {len(m['files'])} files, {total / 1e6:.1f} MB verified ({m.get('stage', '?')})")
    return 0
