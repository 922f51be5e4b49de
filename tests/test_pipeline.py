"""The book's pipeline (vstain.book.pipeline): profile validation, skipping unchanged notebooks,
stopping at the first failure. Runs tiny notebooks in tmp_path (a kernel start each)."""
from __future__ import annotations

import ast
import csv
import json
import re
from concurrent import futures
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from conftest import ROOT, STAGE_BODY, read_json, write_notebook

from vstain.book import kernel, pipeline, rundir, schedule
from vstain.book.pipeline import NotebookFailed, ProfileError


def _stages(book):
    return pipeline.stages_from_toc(book["toc"], book["root"])


def _run(book, **kw):
    # kernels started afresh: a warm process (test_forkserver.py) would import torch for notebooks that
    # import nothing and, started with the first of them, serve none of these short runs
    kw.setdefault("warm_kernels", False)
    return pipeline.run("p", root=book["root"], profile_path=book["profile"], run_dir=str(book["run_dir"]),
                        build=False, log=lambda s: None, **kw)


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "profile_text, expected",
    [
        ("02_b:\n  valeu: 3  # typo\n", ["profile 'p'", "'02_b'", "'valeu'"]),
        ("all:\n  bogus: 1  # declared nowhere\n", ["profile 'p'", "'bogus'", "'all:'"]),
        ("09_nope:\n  value: 2  # no such notebook\n", ["profile 'p'", "'09_nope'"]),
        ("01_a:\n  run_dir: elsewhere  # reserved\n", ["profile 'p'", "'run_dir'"]),
        ("01_a: [1, 2]  # not a mapping\n", ["profile 'p'", "'01_a'", "mapping"]),
    ],
)
def test_profile_errors_name_profile_notebook_and_key(tiny_book, profile_text, expected):
    tiny_book["profile"].write_text(profile_text)
    with pytest.raises(ProfileError) as err:
        pipeline.resolve_parameters(pipeline.load_profile(tiny_book["profile"]), _stages(tiny_book), "runs/p")
    for text in expected:
        assert text in str(err.value)


def test_unknown_key_is_an_error_before_anything_runs(tiny_book):
    tiny_book["profile"].write_text("03_c:\n  valeu: 3  # typo\n")
    with pytest.raises(ProfileError, match="'03_c' declares no parameter 'valeu'"):
        _run(tiny_book)
    assert [tiny_book["runs"](s) for s in tiny_book["stems"]] == [0, 0, 0]


def test_notebook_without_run_dir_is_an_error(tiny_book):
    write_notebook(tiny_book["root"] / "notebooks" / "02_b.ipynb", "value = 1  # a knob", "print(value)")
    with pytest.raises(ProfileError, match="02_b.ipynb: its parameters cell does not declare run_dir"):
        pipeline.resolve_parameters(pipeline.load_profile(tiny_book["profile"]), _stages(tiny_book), "runs/p")


def test_all_keys_reach_declaring_notebooks_and_sections_override(tiny_book):
    write_notebook(tiny_book["root"] / "notebooks" / "03_c.ipynb", 'run_dir = "runs/quick"  # run directory', "pass")
    tiny_book["profile"].write_text("all:\n  value: 5  # shared\n02_b:\n  value: 7  # override\n  fail: true  # why\n")
    params = pipeline.resolve_parameters(pipeline.load_profile(tiny_book["profile"]), _stages(tiny_book), "runs/p")
    assert params == {
        "01_a": {"value": 5, "run_dir": "runs/p"},
        "02_b": {"value": 7, "fail": True, "run_dir": "runs/p"},
        "03_c": {"run_dir": "runs/p"},  # declares no `value`: the all: key does not reach it
    }


def _extending(book, text):
    """A profile ``s`` that extends the tiny book's ``p`` with a notebook 02_x (declares ``value``)."""
    write_notebook(book["root"] / "notebooks" / "02_x.ipynb",
                   'run_dir = "runs/quick"  # run directory\nvalue = 1  # a knob\nfail = False  # raise on purpose',
                   STAGE_BODY.format(stem="02_x"))
    path = book["root"] / "profiles" / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("extends: p\nnotebooks: [notebooks/02_x]\n01_a:\n  value: 3  # would rerun p's 01_a\n", "'01_a' is not one of"),
    ("extends: p\nnotebooks: [notebooks/02_x]\nall:\n  value: 3  # would change p\n", "no 'all:' section"),
    ("extends: p\n", "'notebooks' must list"),
    ("notebooks: [notebooks/02_x]\n", "need 'extends"),
])
def test_extending_profile_may_only_configure_what_it_adds(tiny_book, text, message):
    with pytest.raises(ProfileError, match=message):
        pipeline.load_profile(_extending(tiny_book, text))


def test_extending_profile_reuses_the_run_and_runs_only_its_notebooks(tiny_book):
    """``s`` extends ``p``: in p's run directory, p's notebooks are skipped as unchanged (03_c too,
    though 02_x runs before it: an added notebook feeds none of p's), 02_x runs with s's value, s keeps
    its own timings and toc, and p's next run skips everything again."""
    p_result = _run(tiny_book)
    assert [r.status for r in p_result.stages] == ["ran"] * 3
    path = _extending(tiny_book, "extends: p\npart: Extra\nnotebooks: [notebooks/02_x]\n02_x:\n  value: 4  # why\n")
    result = pipeline.run("s", root=tiny_book["root"], profile_path=path, run_dir=str(tiny_book["run_dir"]),
                          build=False, log=lambda s: None, warm_kernels=False)
    assert [(r.stem, r.status) for r in result.stages] == [
        ("01_a", "skipped"), ("02_b", "skipped"), ("02_x", "ran"), ("03_c", "skipped")]
    assert read_json(tiny_book["run_dir"] / "pipeline" / "02_x.json")["params"]["value"] == 4
    with open(tiny_book["run_dir"] / "timings_s.csv") as f:
        assert [r["stage"] for r in csv.DictReader(f)] == ["01_a", "02_b", "02_x", "03_c"]
    toc = yaml.safe_load((tiny_book["run_dir"] / "pipeline" / "toc_s.yml").read_text())
    assert toc["chapters"][-1] == {"file": "notebooks/02_x"}
    with open(tiny_book["run_dir"] / "timings.csv") as f:  # p's own record is untouched
        assert [r["status"] for r in csv.DictReader(f)] == ["ran"] * 3
    assert [r.status for r in _run(tiny_book).stages] == ["skipped"] * 3


def test_toc_entry_without_file_is_an_error(tiny_book):
    tiny_book["toc"].write_text(tiny_book["toc"].read_text() + "  - file: notebooks/04_missing\n")
    with pytest.raises(FileNotFoundError, match="notebooks/04_missing"):
        _stages(tiny_book)


def test_stages_run_in_number_order_whatever_the_toc_order(tiny_book):
    toc = yaml.safe_load(tiny_book["toc"].read_text())
    toc["chapters"].reverse()
    tiny_book["toc"].write_text(yaml.safe_dump(toc))
    assert [s.stem for s in _stages(tiny_book)] == ["01_a", "02_b", "03_c"]


# --------------------------------------------------------------------------------------------
# Running, skipping, failing
# --------------------------------------------------------------------------------------------
def test_skips_unchanged_and_reruns_what_changed(tiny_book):
    runs = lambda: [tiny_book["runs"](s) for s in tiny_book["stems"]]  # noqa: E731
    result = _run(tiny_book)
    assert [r.status for r in result.stages] == ["ran", "ran", "ran"] and runs() == [1, 1, 1]
    executed = result.book_src / "notebooks" / "02_b.ipynb"
    assert "injected-parameters" in executed.read_text()  # papermill's output, in the staged book

    result = _run(tiny_book)  # nothing changed
    assert [r.status for r in result.stages] == ["skipped"] * 3 and runs() == [1, 1, 1]

    tiny_book["profile"].write_text("02_b:\n  value: 2  # a new value\n")  # 02's parameters ...
    result = _run(tiny_book)  # ... rerun 02, and 03 because 02's manifest changed
    assert [r.status for r in result.stages] == ["skipped", "ran", "ran"] and runs() == [1, 2, 2]

    nb = nbformat.read(tiny_book["root"] / "notebooks" / "03_c.ipynb", 4)  # 03's source
    nb.cells.append(nbformat.v4.new_markdown_cell("A new paragraph."))
    nbformat.write(nb, tiny_book["root"] / "notebooks" / "03_c.ipynb")
    result = _run(tiny_book)
    assert [r.status for r in result.stages] == ["skipped", "skipped", "ran"] and runs() == [1, 2, 3]

    (tiny_book["run_dir"] / "01_a" / "manifest.json").unlink()  # a stage's outputs were removed
    assert [r.status for r in _run(tiny_book).stages] == ["ran", "ran", "ran"]

    assert [r.status for r in _run(tiny_book, force=True).stages] == ["ran", "ran", "ran"]

    with open(tiny_book["run_dir"] / "timings.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == tiny_book["stems"]
    assert all(float(r["wall_s"]) > 0 and float(r["last_success_s"]) > 0 for r in rows)
    record = read_json(tiny_book["run_dir"] / "pipeline" / "02_b.json")
    assert record["params"] == {"value": 2, "run_dir": str(tiny_book["run_dir"])}


def test_stops_at_first_failure_and_names_it(tiny_book, capsys):
    tiny_book["profile"].write_text("02_b:\n  fail: true  # on purpose\n")
    code = pipeline.main(["--profile", "p", "--root", str(tiny_book["root"]), "--run-dir", str(tiny_book["run_dir"]),
                          "--no-build", "--cold-kernels"])
    err = capsys.readouterr().err
    executed = tiny_book["run_dir"] / "book_src" / "notebooks" / "02_b.ipynb"
    assert code == pipeline.EXIT_FAILED_NOTEBOOK
    assert "FAILED at notebook 02_b" in err and "AssertionError: 02_b was asked to fail" in err
    assert str(executed) in err
    assert [tiny_book["runs"](s) for s in tiny_book["stems"]] == [1, 1, 0]  # 03_c never started
    nb = nbformat.read(executed, 4)  # papermill kept the failing cell's traceback
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "AssertionError"
    with open(tiny_book["run_dir"] / "timings.csv") as f:
        assert [(r["stage"], r["status"]) for r in csv.DictReader(f)] == [("01_a", "ran"), ("02_b", "failed")]
    assert not (tiny_book["run_dir"] / "pipeline" / "02_b.json").exists()

    tiny_book["profile"].write_text("all: {}  # fixed\n")  # after the fix, the run resumes at 02_b
    result = _run(tiny_book)
    assert [r.status for r in result.stages] == ["skipped", "ran", "ran"]


def test_raises_exception_cells_are_not_failures(tiny_book):
    """A bad-input demo tagged raises-exception passes (papermill alone would fail the notebook)."""
    write_notebook(tiny_book["root"] / "notebooks" / "01_a.ipynb",
                   'run_dir = "runs/quick"  # run directory\nvalue = 1  # a knob\nfail = False  # raise on purpose',
                   ("raise ValueError('a deliberate bad-input demo')", ["raises-exception"]),
                   "import json, pathlib\nout = pathlib.Path(run_dir) / '01_a'\nout.mkdir(parents=True)\n"
                   "(out / 'manifest.json').write_text('{}')")
    result = _run(tiny_book, only=["01_a"])
    assert [r.status for r in result.stages] == ["ran", "skipped", "skipped"]


def test_a_stage_that_writes_no_manifest_fails(tiny_book):
    write_notebook(tiny_book["root"] / "notebooks" / "01_a.ipynb", 'run_dir = "runs/quick"  # run directory', "pass")
    with pytest.raises(NotebookFailed, match="wrote no .*manifest.json"):
        _run(tiny_book)


# --------------------------------------------------------------------------------------------
# Which notebook waits for which, and notebooks side by side
# --------------------------------------------------------------------------------------------
# A stage that reads the stages it names, logs when it started and ended, and may fail on request.
READER_BODY = """\
import json, pathlib, time
from vstain.book import rundir
{reads}
out = rundir.stage_dir(run_dir, "{stem}")
t0 = time.time()
time.sleep(pause)
(out / "span.json").write_text(json.dumps([t0, time.time()]))
assert not fail, "{stem} was asked to fail"
(out / "manifest.json").write_text(json.dumps({{"stage": "{stem}", "t": time.time()}}))
"""


# Two notebooks that each wait (up to a minute) until the other has started: they overlap in time
# whenever they run side by side, however loaded the machine.
BARRIER = """\
(rundir.resolve(run_dir) / "started_{me}").touch()
deadline = time.time() + 60
while not (rundir.resolve(run_dir) / "started_{other}").exists() and time.time() < deadline:
    time.sleep(0.05)
"""


def _reading_book(book, reads: dict[str, str]):
    """Rewrite the tiny book's notebooks so that each reads the stages ``reads`` gives it (source lines)."""
    for stem in book["stems"]:
        write_notebook(book["root"] / "notebooks" / f"{stem}.ipynb",
                       'run_dir = "runs/quick"  # run directory\npause = 0.0  # seconds of work\n'
                       'fail = False  # raise on purpose',
                       READER_BODY.format(stem=stem, reads=reads.get(stem, "")))


def _deps(book, params=None):
    stages = _stages(book)
    return schedule.dependencies([s.stem for s in stages], {s.stem: s.source for s in stages},
                                 params or {s.stem: {} for s in stages})


def test_a_notebook_waits_for_the_stages_it_reads_and_no_other(tiny_book):
    _reading_book(tiny_book, {"02_b": 'rundir.require(run_dir, "01_a")',
                              "03_c": 'src = rundir.optional(run_dir, stage)\n%time rundir.require(run_dir, "01_a")'})
    # 03_c names one stage by a variable: it waits for the stages its parameters name
    assert _deps(tiny_book, {"01_a": {}, "02_b": {}, "03_c": {"stage": "02_b"}}) == {
        "01_a": [], "02_b": ["01_a"], "03_c": ["01_a", "02_b"]}
    assert _deps(tiny_book, {"01_a": {}, "02_b": {}, "03_c": {"stage": {"x": "01_a", "y": "elsewhere"}}}) == {
        "01_a": [], "02_b": ["01_a"], "03_c": ["01_a"]}
    # a read that a false parameter switches off is no read; one that no parameter names waits for all
    _reading_book(tiny_book, {"02_b": 'rundir.require(run_dir, "01_a")',
                              "03_c": 'b = rundir.optional(run_dir, "02_b") if use_b else None\n'
                                      'rundir.require(run_dir, "01_a")'})
    assert _deps(tiny_book, {"01_a": {}, "02_b": {}, "03_c": {"use_b": False}})["03_c"] == ["01_a"]
    assert _deps(tiny_book, {"01_a": {}, "02_b": {}, "03_c": {"use_b": True}})["03_c"] == ["01_a", "02_b"]
    _reading_book(tiny_book, {"03_c": 'rundir.require(run_dir, [s for s in ("02_b",)][0])'})
    assert _deps(tiny_book)["03_c"] == ["01_a", "02_b"]
    _reading_book(tiny_book, {"03_c": 'rundir.require(run_dir, "01_a")\nif True'})  # a cell that does not parse
    assert _deps(tiny_book)["03_c"] == ["01_a", "02_b"]


def test_a_run_recorded_before_dependencies_were_known_is_not_redone(tiny_book):
    """Records once hashed the manifests of every stage before a notebook; such a record of an
    unchanged run still counts as unchanged."""
    _reading_book(tiny_book, {"02_b": 'rundir.require(run_dir, "01_a")', "03_c": 'rundir.require(run_dir, "01_a")'})
    _run(tiny_book)
    stages, record_path = _stages(tiny_book), tiny_book["run_dir"] / "pipeline" / "03_c.json"
    params = {"run_dir": str(tiny_book["run_dir"])}
    before = {s.stem: tiny_book["run_dir"] / s.stem / "manifest.json" for s in stages[:2]}
    record = read_json(record_path)
    assert record["inputs"] != pipeline.inputs_hash(stages[2], params, before)  # 03_c reads 01_a only
    record_path.write_text(json.dumps({**record, "inputs": pipeline.inputs_hash(stages[2], params, before)}))
    assert [r.status for r in _run(tiny_book).stages] == ["skipped"] * 3


def test_a_notebook_that_names_no_stage_waits_for_every_stage_before_it(tiny_book):
    assert _deps(tiny_book) == {"01_a": [], "02_b": ["01_a"], "03_c": ["01_a", "02_b"]}


def test_notebooks_waiting_for_each_other_are_an_error(tiny_book):
    _reading_book(tiny_book, {"01_a": 'rundir.optional(run_dir, "03_c")', "02_b": 'rundir.require(run_dir, "01_a")',
                              "03_c": 'rundir.require(run_dir, "02_b")'})
    with pytest.raises(schedule.DependencyError, match="01_a -> 03_c -> 02_b -> 01_a"):
        _run(tiny_book)


def test_chain_lengths_count_the_notebooks_on_the_longest_chain_from_each():
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["c"], "e": ["b", "d"], "f": []}
    assert schedule.chain_lengths(deps) == {"a": 4, "b": 2, "c": 3, "d": 2, "e": 1, "f": 1}


def test_of_the_ready_notebooks_the_head_of_the_longest_chain_starts_first(tiny_book):
    # 01_a ends a branch; 03_c waits for 02_b: 02_b heads the longer chain and runs first, although
    # the book lists 01_a before it; 01_a and 03_c then tie and keep the book's order
    elsewhere = 'rundir.optional(run_dir, "00_not_in_this_book")'  # reads no stage of the book
    _reading_book(tiny_book, {"01_a": elsewhere, "02_b": elsewhere, "03_c": 'rundir.require(run_dir, "02_b")'})
    assert _deps(tiny_book) == {"01_a": [], "02_b": [], "03_c": ["02_b"]}
    tiny_book["profile"].write_text("all:\n  pause: 0.0  # no work\n")
    _run(tiny_book)
    starts = {s: read_json(tiny_book["run_dir"] / s / "span.json")[0] for s in tiny_book["stems"]}
    assert sorted(starts, key=starts.get) == ["02_b", "01_a", "03_c"]


def test_the_project_chain_goes_before_the_notebooks_that_end_a_branch(tmp_path):
    """In the quick study (two notebooks at a time), 05_wgan, which 05b, 05c and 07 wait for, starts
    before the study's own 03b and 04c, which nothing in the book's chain waits for."""
    stages = _profile_stages(ROOT / "profiles" / "quick-study.yaml", tmp_path)
    chain = schedule.chain_lengths(
        schedule.dependencies([s.stem for s in stages], {s.stem: s.source for s in stages}, {}))
    assert chain["04_unet"] > chain["05_wgan"] > chain["05b_wgan_from_unet"] > chain["07_results"] > 1
    assert chain["05_wgan"] > max(chain["03b_ablation"], chain["04c_unet_seed"], chain["09_predict"])


def test_the_project_notebooks_wait_for_what_they_read(tmp_path):
    stages = _profile_stages(ROOT / "profiles" / "quick-study.yaml", tmp_path)
    deps = schedule.dependencies(
        [s.stem for s in stages], {s.stem: s.source for s in stages},
        {s.stem: ({"model_stage": "05_wgan"} if s.stem == "09_predict" else {}) for s in stages})
    assert deps["01_data"] == [] and deps["06_classifier"] == ["01_data", "03_denoising"]
    # every model stage of 07's model_stages, and 09's model_stage as the profile sets it
    assert {"04_unet", "05_wgan", "05b_wgan_from_unet", "05c_l1_control", "06_classifier"} <= set(deps["07_results"])
    assert deps["09_predict"] == ["03_denoising", "05_wgan"]
    # an optional stage the book has is waited for, even one that sorts after the notebook, unless a
    # false parameter switches the read off (03b scores 04_unet only with include_book_unet)
    assert "04c_unet_seed" in deps["07c_adversarial_sweep"] and "04_unet" not in deps["03b_ablation"]
    with_unet = schedule.dependencies([s.stem for s in stages], {s.stem: s.source for s in stages},
                                      {"03b_ablation": {"include_book_unet": True}})
    assert "04_unet" in with_unet["03b_ablation"]


def test_independent_notebooks_run_side_by_side_and_a_failure_stops_only_what_follows(tiny_book, monkeypatch):
    # the threads chosen per kernel (threads_for_next), as under `make book`: not the test session's one
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    # the pipeline learns of 02_b and 03_c ending in one batch (as on a busy machine), failure first
    monkeypatch.setattr(pipeline, "wait", lambda fs, return_when: futures.wait(fs, return_when=futures.ALL_COMPLETED))
    _reading_book(tiny_book, {s: f'rundir.require(run_dir, "01_a")\n{BARRIER.format(me=s, other=o)}'
                              for s, o in [("02_b", "03_c"), ("03_c", "02_b")]})
    # 02_b fails: 03_c, running beside it, finishes; the failure is raised and recorded
    tiny_book["profile"].write_text("all:\n  pause: 1.0  # seconds of work after both started\n"
                                    "02_b:\n  fail: true  # on purpose\n")
    with pytest.raises(NotebookFailed, match="02_b was asked to fail"):
        _run(tiny_book, jobs=2)
    with open(tiny_book["run_dir"] / "timings.csv") as f:
        assert {r["stage"]: r["status"] for r in csv.DictReader(f)} == {"01_a": "ran", "02_b": "failed", "03_c": "ran"}
    span = {s: read_json(tiny_book["run_dir"] / s / "span.json") for s in tiny_book["stems"]}
    assert span["01_a"][1] < min(span["02_b"][0], span["03_c"][0])  # both waited for 01_a
    assert span["02_b"][0] < span["03_c"][1] and span["03_c"][0] < span["02_b"][1]  # and overlapped

    # fixed, the run resumes at 02_b alone: 03_c reads only 01_a, which did not change
    tiny_book["profile"].write_text("all:\n  pause: 1.0  # as before\n")
    assert [r.status for r in _run(tiny_book, jobs=2).stages] == ["skipped", "ran", "skipped"]


@pytest.mark.parametrize("jobs", ["0", "two", "true", "1.5"])
def test_jobs_of_a_profile_is_a_whole_number_of_at_least_one(tiny_book, jobs):
    tiny_book["profile"].write_text(f"jobs: {jobs}  # notebooks at once\n")
    with pytest.raises(ProfileError, match="profile 'p'.*'jobs' must be a whole number"):
        _run(tiny_book)


def test_jobs_carry_to_the_profiles_built_on_one():
    load = lambda name: pipeline.load_profile(ROOT / "profiles" / f"{name}.yaml")  # noqa: E731
    assert load("quick").jobs == 2 and load("quick-study").jobs == 2  # extends quick
    assert load("book").jobs == 1 and load("study").jobs == 1 and load("smoke-full").jobs == load("full").jobs


def test_a_notebook_alone_gets_every_core_and_two_side_by_side_half_each():
    two = lambda running, ready: kernel.threads_for_next(2, 2, running, ready)  # noqa: E731
    assert two([], 1) == 2  # alone: as with one job
    assert two([], 2) == 1 and two([1], 1) == 1  # two side by side: one thread each
    assert two([2], 1) is None and two([1, 1], 1) is None  # the cores are taken: wait
    assert kernel.threads_for_next(2, 16, [], 3) == 8
    assert kernel.kernel_environment(1) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert kernel.kernel_environment(0) == {}  # torch's default


# --------------------------------------------------------------------------------------------
# The project's own profiles
# --------------------------------------------------------------------------------------------
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def _profile_stages(path: Path, tmp: Path) -> list:
    """The notebooks a project profile runs: the book's, plus its own if it extends one."""
    prof = pipeline.load_profile(path)
    toc = ROOT / "_toc.yml"
    if prof.extends:
        toc = pipeline.extended_toc(toc, prof.part, prof.notebooks, tmp / f"toc_{path.stem}.yml")
    return pipeline.stages_from_toc(toc, ROOT)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_project_profiles_fit_the_notebooks(path, tmp_path):
    stages = _profile_stages(path, tmp_path)
    params = pipeline.resolve_parameters(pipeline.load_profile(path), stages, f"runs/{path.stem}")
    assert set(params) == {s.stem for s in stages}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_every_profile_value_says_why(path):
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[\w.-]+:\s*\S", line):  # a key with a value on its line
            assert re.search(r"\s#\s*\S", line), f"{path.name}:{n}: give the reason in a trailing comment: {line!r}"


def test_quick_profile_is_the_notebook_defaults():
    prof = pipeline.load_profile(ROOT / "profiles" / "quick.yaml")
    # quick is the notebooks' defaults: it may only restate them, and today it sets nothing at all
    assert not prof.common and not any(prof.sections.values())
    stages = {s.stem: s for s in pipeline.stages_from_toc(ROOT / "_toc.yml", ROOT)}
    for stem, values in [(None, prof.common), *prof.sections.items()]:
        for key, value in values.items():
            for stage in ([stages[stem]] if stem else stages.values()):
                declared = papermill.inspect_notebook(str(stage.source))
                if key in declared:
                    assert ast.literal_eval(declared[key]["default"]) == value, (stage.stem, key)


def test_quick_study_is_the_study_notebooks_at_their_defaults():
    """quick-study (run by `make test` after the quick book) adds study.yaml's notebooks to the quick
    book and sets nothing, so it runs them exactly as nbval would."""
    quick_study = pipeline.load_profile(ROOT / "profiles" / "quick-study.yaml")
    study = pipeline.load_profile(ROOT / "profiles" / "study.yaml")
    assert quick_study.extends == "quick" and quick_study.notebooks == study.notebooks
    assert not quick_study.common and not any(quick_study.sections.values())


def test_project_toc_lists_every_notebook(tmp_path):
    listed = {s.stem for path in PROFILES for s in _profile_stages(path, tmp_path)}
    stored = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert stored <= listed, f"notebooks missing from _toc.yml: {sorted(stored - listed)}"
    assert Path(ROOT / "_config.yml").exists()


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_wgan_generator_matches_the_unet_it_starts_from(path, tmp_path):
    """05 loads 04's checkpoint when init_from_unet, and 05b always does with 05's settings: the
    generator they build must be the U-Net's."""
    stages = _profile_stages(path, tmp_path)
    params = pipeline.resolve_parameters(pipeline.load_profile(path), stages, f"runs/{path.stem}")
    defaults = {s.stem: {k: ast.literal_eval(v["default"]) for k, v in papermill.inspect_notebook(str(s.source)).items()}
                for s in stages if s.stem in ("04_unet", "05_wgan")}
    unet = {**defaults["04_unet"], **params["04_unet"]}
    wgan = {**defaults["05_wgan"], **params["05_wgan"]}
    assert wgan["base_width"] == unet["base_width"], path.name  # 05b fine-tunes 04 with 05's width


def test_progress_bars_are_stored_as_a_terminal_shows_them():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("pass")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text="Epoch 0:  10%\r"),
                    nbformat.v4.new_output("stream", name="stderr", text="Epoch 0:  50%\rEpoch 0: 100%\ndone\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="result 1\n")]
    nb.cells.append(cell)
    out = kernel.render_carriage_returns(nb).cells[0].outputs
    assert [o["name"] for o in out] == ["stderr", "stdout"]
    assert out[0]["text"] == "Epoch 0: 100%\ndone\n"
    assert out[1]["text"] == "result 1\n"


def test_staged_notebooks_collapse_code_but_imports_and_parameters(tiny_book):
    """In the staged book every code cell is tagged hide-input except the Imports cell, the
    parameters cells, a bad-input demo and cells already tagged; the stored notebook is untouched."""
    cells = [("import json  # the Imports cell", []), ('run_dir = "runs/quick"  # run directory', ["parameters"]),
             ('run_dir = "runs/p"', ["injected-parameters"]), ("x = json.loads('[1, 2]')", []),
             ("print(x)", ["remove-input"]), ("json.loads('{')", ["raises-exception"]), ("x.append(3)", ["hide-cell"]),
             ("len(x)", ["remove-output"])]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 01_a")])
    for source, tags in cells:
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)}))
    nb.cells.append(nbformat.v4.new_markdown_cell("The end."))
    stored = tiny_book["root"] / "notebooks" / "01_a.ipynb"
    nbformat.write(nb, stored)
    book_src = tiny_book["run_dir"] / "book_src"
    (book_src / "notebooks").mkdir(parents=True)
    staged = book_src / "notebooks" / "01_a.ipynb"
    staged.write_bytes(stored.read_bytes())  # as the pipeline's execute leaves it
    for _ in range(2):  # a second staging adds nothing
        pipeline.stage_book_sources(tiny_book["root"], book_src, tiny_book["toc"], "p", "runs/p")
    got = [c.metadata.get("tags", []) for c in nbformat.read(staged, 4).cells]
    assert got == [[], [], ["parameters"], ["injected-parameters"], ["hide-input"], ["remove-input"],
                   ["raises-exception"], ["hide-cell"], ["remove-output", "hide-input"], []]
    assert [c.metadata.get("tags", []) for c in nbformat.read(stored, 4).cells][4] == []


def test_study_seed_run_differs_from_the_book_unet_only_in_its_seed(tmp_path):
    """04c_unet_seed must train the book's U-Net again with another seed: every value the book sets
    for 04_unet, the study sets the same for 04c_unet_seed, and the notebooks' defaults agree."""
    study = ROOT / "profiles" / "study.yaml"
    params = pipeline.resolve_parameters(pipeline.load_profile(study), _profile_stages(study, tmp_path), "runs/book")
    stages = {s.stem: s for s in _profile_stages(study, tmp_path)}
    defaults = {stem: {k: ast.literal_eval(v["default"]) for k, v in papermill.inspect_notebook(str(stages[stem].source)).items()}
                for stem in ("04_unet", "04c_unet_seed", "07c_adversarial_sweep", "07d_flow")}
    unet = {**defaults["04_unet"], **params["04_unet"]}
    seed = {**defaults["04c_unet_seed"], **params["04c_unet_seed"]}
    assert {k: v for k, v in seed.items() if k != "seed"} == {k: unet[k] for k in seed if k != "seed"}
    assert seed["seed"] != unet["seed"]
    sweep = {**defaults["07c_adversarial_sweep"], **params["07c_adversarial_sweep"]}
    assert sweep["base_width"] == unet["base_width"]  # every fine-tune starts from the book's U-Net
    flow = {**defaults["07d_flow"], **params["07d_flow"]}  # the flow trains at the U-Net's recipe and steps
    recipe = ("base_width", "optimizer", "lr", "batch_size", "crop", "samples", "max_steps", "seed")
    assert {k: flow[k] for k in recipe} == {k: unet[k] for k in recipe}


def test_the_tests_run_in_their_own_runs_folder(monkeypatch, tmp_path):
    """Under pytest ``runs/<name>`` resolves into .test-runs/, so a test never deletes a user's run;
    without the variable it is the project's runs/, and an absolute run directory is kept."""
    from conftest import TEST_RUNS
    assert rundir.resolve("runs/quick") == TEST_RUNS.resolve() / "quick"
    assert rundir.resolve("elsewhere/x") == rundir.repo_root() / "elsewhere" / "x"
    assert rundir.resolve(tmp_path / "runs" / "p") == tmp_path / "runs" / "p"
    monkeypatch.delenv(rundir.RUNS_ENV)
    assert rundir.resolve("runs/quick") == rundir.repo_root() / "runs" / "quick"
    assert rundir.resolve("runs/quick", tmp_path) == tmp_path / "runs" / "quick"
