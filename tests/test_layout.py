"""The package's shape: one room (package) per stage of the data flow, each importing only the rooms
upstream of it (no circle anywhere, the shared vocabulary at the root, the book's machinery never
imported by the science), few flat modules at the top, short files, and every module importing on
its own."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vstain"
ROOT_MODULES = ("vstain.channels", "vstain.volumes", "vstain.threads")  # import nothing of the project
MAX_LINES = 450  # "about 400"
# The files that may be longer, and why.
LONGER: dict[str, str] = {}  # module -> why it may be longer (none needs to be)
MAX_TOP_LEVEL = 8  # flat modules at vstain/'s top, __init__ and __main__ included
# What each room may import besides itself and the root vocabulary (channels, volumes, threads): the rooms
# upstream of it in the data flow. A room is a package under vstain/, or a flat top-level module.
MAY_IMPORT = {
    "vstain.models": set(),
    "vstain.losses": set(),
    "vstain.modelfiles": {"vstain.models", "vstain.preprocess"},
    "vstain.data": set(),
    "vstain.preprocess": {"vstain.data"},
    "vstain.inference": {"vstain.models", "vstain.modelfiles", "vstain.data", "vstain.preprocess"},
    "vstain.training": {"vstain.models", "vstain.losses", "vstain.modelfiles", "vstain.preprocess",
                        "vstain.inference"},
    "vstain.evaluate": {"vstain.models", "vstain.modelfiles", "vstain.data", "vstain.preprocess",
                        "vstain.inference"},
    "vstain.studies": {"vstain.models", "vstain.losses", "vstain.modelfiles", "vstain.data", "vstain.preprocess",
                       "vstain.inference", "vstain.training", "vstain.evaluate"},
    "vstain.plots": {"vstain.data", "vstain.preprocess", "vstain.evaluate"},
    "vstain.book": set(),
    "vstain.__main__": {"vstain.inference"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def project_imports(path: Path, known: set[str]) -> set[str]:
    """Every ``vstain`` module that ``path`` imports, at any depth (function-level imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vstain"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "vstain":
                continue
            # `from . import rundir` names a module; `from .channels import TARGETS` a name in one
            subs = {f"{mod}.{a.name}" for a in node.names} & known
            found |= subs or {mod}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: project_imports(p, set(mods)) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    colour = {m: 0 for m in graph}  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if colour[n] == 1:
                return stack[stack.index(n):] + [n]
            if colour[n] == 0 and (c := visit(n)):
                return c
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("root", ROOT_MODULES)
def test_shared_vocabulary_imports_nothing_of_the_project(root):
    assert import_graph()[root] == set()


def room(module: str) -> str:
    """The room of a module: ``vstain.training.wgan`` -> ``vstain.training``; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def test_every_room_imports_only_what_lies_upstream():
    rooms = {room(m) for m in modules()} - {"vstain", *ROOT_MODULES}
    assert rooms == set(MAY_IMPORT), f"rooms without a rule, or rules without a room: {rooms ^ set(MAY_IMPORT)}"
    allowed = {r: MAY_IMPORT[r] | {r, *ROOT_MODULES} for r in MAY_IMPORT}
    offenders = {m: sorted(room(d) for d in deps if room(d) not in allowed[room(m)])
                 for m, deps in import_graph().items() if room(m) in allowed}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_few_flat_modules_at_the_top():
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(flat) <= MAX_TOP_LEVEL, flat


def test_science_never_imports_the_book_machinery():
    offenders = {m: sorted(d) for m, d in import_graph().items()
                 if not m.startswith("vstain.book") and any(x.startswith("vstain.book") for x in d)}
    assert offenders == {}


def test_evaluation_knows_nothing_of_training():
    training = {"vstain.training.unet", "vstain.training.trainer", "vstain.training.wgan", "vstain.training.configs"}
    offenders = {m: sorted(d & training) for m, d in import_graph().items()
                 if m.startswith("vstain.evaluate") and d & training}
    assert offenders == {}


# Modules that notebooks without training or a classifier import (every notebook kernel pays for its
# imports): they must not load Lightning (~4 s) or MONAI (~3 s, it loads all its subpackages).
LIGHT = ("vstain.inference.infer", "vstain.evaluate.classifier", "vstain.evaluate.perceptual",
         "vstain.studies.controls", "vstain.studies.curves", "vstain.studies.sweep", "vstain.modelfiles")


def test_every_module_imports_in_a_fresh_interpreter_and_evaluation_needs_no_lightning():
    """Every module imports in a fresh interpreter; the :data:`LIGHT` ones, imported first, load neither
    Lightning nor MONAI (one interpreter for both checks: each start costs seconds)."""
    names = [*LIGHT, *sorted(set(modules()) - set(LIGHT))]
    code = ("import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
            f"    if n == {LIGHT[-1]!r}:\n"
            "        print(sorted(k for k in ('lightning', 'monai') if k in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                       cwd=PACKAGE.parent, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", f"importing {LIGHT} loaded {r.stdout.strip()}"


def test_modules_open_with_a_docstring_and_stay_short():
    too_long = {}
    for name, path in modules().items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no module docstring"
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and name not in LONGER:
            too_long[name] = n
    assert too_long == {}, f"over {MAX_LINES} lines without a reason in LONGER: {too_long}"
    assert set(LONGER) <= set(modules()), "LONGER names a module that does not exist"


def test_no_module_patches_a_library_at_runtime():
    """No module rewrites a function's code (``f.__code__ = ...``): a fix for a library belongs in the lock."""
    offenders = [f"{name}:{node.lineno}" for name, path in modules().items()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                 and any(isinstance(t, ast.Attribute) and t.attr == "__code__"
                         for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert offenders == []
