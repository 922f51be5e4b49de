"""The stored notebooks: no outputs, a papermill ``parameters`` cell that papermill can read in
full (with ``run_dir`` and ``seed``), no ``def``/``class`` (logic lives in vstain), and an opening
that cites the thesis."""
from __future__ import annotations

import ast
import re

import nbformat
import papermill
import pytest
from conftest import ROOT

from vstain.book import rundir

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code(cell) -> str:
    """A cell's source with IPython magics and shell escapes blanked, so ast can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in cell.source.splitlines())


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def nb(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_stored_without_outputs(nb):
    path, book = nb
    dirty = [i for i, c in enumerate(book.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them (the pipeline and nbval run the notebook)"


def test_parameters_cell(nb):
    path, book = nb
    cells = [c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged 'parameters', found {len(cells)}"
    assigned = [t.id for node in ast.parse(_code(cells[0])).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)]
    declared = papermill.inspect_notebook(str(path))
    unreadable = [name for name in assigned if name not in declared]
    assert not unreadable, (f"{path.name}: papermill cannot read the parameters {unreadable} "
                            "(a second '=' on the line, e.g. in the comment, hides it from profiles)")
    for name in ("run_dir", "seed"):
        assert name in declared, f"{path.name}: the parameters cell must declare {name}"
    assert ast.literal_eval(declared["run_dir"]["default"]) == "runs/quick", f"{path.name}: run_dir default"
    missing_help = [n for n, p in declared.items() if not p["help"].strip()]
    assert not missing_help, f"{path.name}: give each parameter a trailing comment: {missing_help}"


def test_no_functions_or_classes(nb):
    path, book = nb
    for i, cell in enumerate(book.cells):
        if cell.cell_type != "code":
            continue
        for node in ast.walk(ast.parse(_code(cell))):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), (
                f"{path.name}, cell {i}: '{node.name}' is defined in the notebook; move it into vstain")


def test_opens_with_title_and_the_thesis(nb):
    path, book = nb
    first = book.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), f"{path.name}: open with a # title"
    opening = " ".join(c.source for c in book.cells[:3] if c.cell_type == "markdown")
    assert re.search(r"\{cite(:\w+)?\}`[^`]*vstain_thesis2023", opening), (
        f"{path.name}: the opening paragraph should cite the thesis section it reproduces "
        "({cite}`vstain_thesis2023`)")


def test_a_notebook_opened_too_early_names_the_one_to_run_first(nb, tmp_path):
    """In JupyterLab the notebooks run in order; one opened before its upstream stage ran must stop
    at its first cell after the parameters with an error naming the notebook to run first."""
    from vstain.book import rundir

    path, book = nb
    code = [c for c in book.cells if c.cell_type == "code"]
    i = next(k for k, c in enumerate(code) if "parameters" in c.get("metadata", {}).get("tags", []))
    first = code[i + 1].source
    upstream = re.findall(r'rundir\.require\(run_dir, "(\w+)"\)', first)
    if path.stem == "01_data":
        assert not upstream
        return
    assert upstream, f"{path.name}: the first cell after the parameters does not check its upstream stages"
    with pytest.raises(FileNotFoundError, match=rf"run notebooks/{upstream[0]}\.ipynb first"):
        rundir.require(tmp_path, upstream[0])


def test_the_manifest_records_every_parameter(nb):
    """A notebook ends with ``rundir.finish(out, globals(), ...)``: its manifest records the resolved
    value of every declared parameter, found by inspecting the notebook, so none can be left out."""
    path, book = nb
    calls = [node for c in book.cells if c.cell_type == "code" for node in ast.walk(ast.parse(_code(c)))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "rundir.finish"]
    assert len(calls) == 1, f"{path.name}: expected one rundir.finish call, found {len(calls)}"
    assert [ast.unparse(a) for a in calls[0].args[:2]] == ["out", "globals()"], ast.unparse(calls[0])
    cell = next(c for c in book.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec(compile(_code(cell), path.name, "exec"), namespace)
    recorded = rundir.notebook_parameters(path.stem, namespace)
    assert list(recorded) == list(papermill.inspect_notebook(str(path)))
    assert all(recorded[k] == namespace[k] for k in recorded)


def test_a_namespace_without_a_declared_parameter_is_refused():
    with pytest.raises(KeyError, match="seed"):
        rundir.notebook_parameters("04_unet", {"run_dir": "runs/quick"})
    with pytest.raises(FileNotFoundError, match="named after its notebook"):
        rundir.notebook_parameters("99_none", {})


# Numbers in the notebooks' prose that are constants, not results of a run: thesis values, the real
# dataset's acquisition, definitions and thresholds. Any other decimal or time in Markdown is a
# result typed by hand, which goes stale on the next run: render it from the run instead.
PROSE_CONSTANTS = {
    "01_data": {"0.29 µm", "0.108 µm", "0.5 GB"},  # the real dataset's voxel size; its download per FOV
    "03_denoising": {"0.6745", "0.05"},  # Donoho's MAD constant; the thesis claim's SSIM tolerance
    "05_wgan": {"0.1"},  # the coarse-structure threshold of the sharpness measure
    "07_results": {"0.65", "0.108 µm", "0.05", "0.95"},  # the thesis' membrane PCC (Table 4.1); the real lateral voxel size; F1clf's floor and ceiling (comparison.F1_FLOOR, F1_CEILING)
    "08_downstream": {"0.5", "0.5 µm"},  # the IoU of a match; the envelope's shell width
    "09_predict": {"0.29", "0.108"},  # the real dataset's voxel size
    "10_realism": {"7.2", "1.25", "0.29 µm", "0.108 µm"},  # published values: the mitochondrial fraction, the NA, the real voxel size
}
_MATH_AND_CODE = re.compile(r"\{cite[^}]*\}`[^`]*`|`[^`]*`|\$[^$]*\$|\[[^\]]*\]\([^)]*\)")
_RESULT_LIKE = re.compile(r"(?<![\w.-])(\d+(?:\.\d+)*)(?:\s*(s|min|minutes?|seconds?|hours?|h|µm|GB|GiB|MiB)\b)?")
_SECTION = re.compile(r"[1-9](\.\d)+")  # 3.2, 4.1, 3.2.1: the thesis' sections, tables and figures


def typed_results(path) -> list[str]:
    """Decimals and times in a notebook's Markdown that are not section or figure numbers."""
    found = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "markdown":
            continue
        text = _MATH_AND_CODE.sub("", cell.source)
        for m in _RESULT_LIKE.finditer(text):
            number, unit = m.group(1), m.group(2)
            if unit is None and ("." not in number or _SECTION.fullmatch(number)):
                continue
            found.append(number + (f" {unit}" if unit else ""))
    return found


def test_no_run_results_typed_into_the_prose(nb):
    path, _ = nb
    typed = [t for t in typed_results(path) if t not in PROSE_CONSTANTS.get(path.stem, set())]
    assert typed == [], (f"{path.name} types {typed} into its Markdown: render run results from the run, "
                         "or add a true constant to PROSE_CONSTANTS with its reason")


def test_the_prose_check_finds_a_typed_time_and_score(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("Section 4.2 says so. It took about 12 minutes and scored 0.87; "
                                              "`x = 0.3` is code and $0.5$ is maths.")]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert typed_results(tmp_path / "x.ipynb") == ["12 minutes", "0.87"]
