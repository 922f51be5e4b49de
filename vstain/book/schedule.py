"""Which notebooks of the book wait for which, so that independent ones can run side by side.

A notebook reads an upstream stage only through ``rundir.require(run_dir, <stage>)`` or
``rundir.optional(run_dir, <stage>)`` (the run-directory convention). Its dependencies are read
from its code cells with :mod:`ast`:

- a stage named by a string literal in such a call;
- when a call names its stage through a variable (``rundir.require(run_dir, model_stage)``, or a
  loop over ``model_stages.items()``), every stage that the notebook's resolved parameters name
  (strings anywhere in their values: ``"04_unet"``, ``{"U-Net": "04_unet", ...}``);
- a notebook that names no stage at all, names its stage through a variable that no parameter
  explains, or has a code cell that cannot be parsed waits for every stage before it in the book's
  order (the safe reading of a notebook that does not follow the convention);
- a read in the branch of an ``if`` whose test is a parameter set to false
  (``rundir.optional(run_dir, "04_unet") if include_book_unet else None``) is no read.

An optional stage is waited for like a required one when the book has it, so a notebook sees the
same upstream folders however the runs are interleaved.

Of the notebooks ready to start, the one heading the longest chain of notebooks that wait on it goes
first (:func:`chain_lengths`): a notebook that others wait for does not queue behind one that ends
a branch.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from . import rundir

READERS = ("require", "optional")  # the rundir calls by which a notebook reads an upstream stage
_MAGIC = re.compile(r"^(\s*)%{1,2}\w+\s*")  # an IPython magic: the code after it is still read
_SHELL = re.compile(r"^\s*!")  # a shell line: nothing for Python to read


def _python(source: str) -> str:
    """A cell's source as plain Python: magics stripped to the code they run, shell lines dropped."""
    return "\n".join(_MAGIC.sub(r"\1", line) for line in source.splitlines() if not _SHELL.match(line))


class DependencyError(ValueError):
    """Notebooks that wait for each other in a circle."""


def _switched_off(node: ast.AST, parents: dict[ast.AST, ast.AST], values: Mapping[str, Any]) -> bool:
    """Whether ``node`` sits in the taken-if-true branch of an ``if``/conditional expression whose
    test is a parameter that is false (``rundir.optional(...) if include_book_unet else None``)."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, (ast.If, ast.IfExp)) and isinstance(parent.test, ast.Name) \
                and parent.test.id in values and not values[parent.test.id]:
            if child is parent.body or (isinstance(parent.body, list) and child in parent.body):
                return True
        child, parent = parent, parents.get(parent)
    return False


def stage_calls(notebook: Path, values: Mapping[str, Any] | None = None) -> tuple[set[str], bool, bool]:
    """The stages ``notebook`` names by string literal in ``rundir.require``/``rundir.optional``,
    whether some call names its stage through a variable instead, and whether a code cell cannot be
    parsed (then what it reads cannot be told). A call switched off by a false parameter in
    ``values`` (the notebook's resolved parameters) is no read."""
    literal: set[str] = set()
    dynamic = unparsed = False
    for cell in json.loads(Path(notebook).read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        try:
            tree = ast.parse(_python(source))
        except SyntaxError:
            unparsed = True
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in READERS and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "rundir" and len(node.args) >= 2):
                continue
            if _switched_off(node, parents, values or {}):
                continue
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                literal.add(arg.value)
            else:
                dynamic = True
    return literal, dynamic, unparsed


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            yield from _strings(v)


def dependencies(stems: Sequence[str], sources: Mapping[str, Path],
                 params: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """Stem -> the stems it waits for (see the module docstring), for the stages ``stems`` in the
    book's order; ``params``: what the pipeline injects into each (laid over the notebook's own
    defaults). A name that is not one of ``stems`` (a stage of another profile) is left out.

    Raises:
        DependencyError: two or more notebooks wait for each other.
    """
    known = set(stems)
    deps: dict[str, list[str]] = {}
    for i, stem in enumerate(stems):
        values = {**rundir.parameter_defaults(sources[stem]), **params.get(stem, {})}
        literal, dynamic, unparsed = stage_calls(sources[stem], values)
        named = set(literal)
        if dynamic:
            from_params = {s for s in _strings(values) if s in known} - {stem}
            named |= from_params or set(stems[:i])  # a read that no parameter names: all before it
        if unparsed or not (literal or dynamic):
            named |= set(stems[:i])
        deps[stem] = sorted((named & known) - {stem}, key=stems.index)
    _check_acyclic(stems, deps)
    return deps


def chain_lengths(deps: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Stem -> how many notebooks the longest chain that starts at it holds (itself, then a notebook
    that waits for it, then one that waits for that ...), for ``deps`` from :func:`dependencies`.

    When fewer notebooks may run than are ready, starting the one with the longest chain first
    shortens the run: a notebook that ends a branch can run beside the chain instead of holding it up.
    Counted in notebooks, not seconds, so the order is the same on a fresh run and a repeated one."""
    waiting: dict[str, list[str]] = {stem: [] for stem in deps}
    for stem, ds in deps.items():
        for d in ds:
            waiting[d].append(stem)
    lengths: dict[str, int] = {}

    def length(stem: str) -> int:
        if stem not in lengths:
            lengths[stem] = 1 + max((length(w) for w in waiting[stem]), default=0)
        return lengths[stem]

    for stem in deps:
        length(stem)
    return lengths


def _check_acyclic(stems: Sequence[str], deps: Mapping[str, list[str]]) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(stem: str, path: list[str]) -> None:
        if state.get(stem) == 2:
            return
        if state.get(stem) == 1:
            cycle = path[path.index(stem):] + [stem]
            raise DependencyError(f"notebooks wait for each other: {' -> '.join(cycle)}")
        state[stem] = 1
        for d in deps[stem]:
            visit(d, [*path, stem])
        state[stem] = 2

    for stem in stems:
        visit(stem, [])
