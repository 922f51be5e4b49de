"""The book: its bibliography, its links, the browser check, and the quick book built and opened
in headless Chromium (the slow test; `make test` installs Chromium first)."""
from __future__ import annotations

import csv
import re

import nbformat
import pytest
from conftest import (QUICK_BOOK_EXECUTED, ROOT, TEST_RUNS, Background, in_background, pipeline_in_background,
    take_background)

from vstain.book import browser, devtools, pipeline

# Keys the notebooks share (CONTRACT): they must exist with exactly these names.
SHARED_KEYS = {"vstain_thesis2023", "viana2023", "bray2012", "krull2019", "gulrajani2017", "arjovsky2017",
               "isola2018", "ronneberger2015", "crosszamirski2022", "ounkomol2018", "christiansen2018",
               "zhang2018lpips", "ulyanov2017"}
QUICK_BOOK = TEST_RUNS / "quick"  # the notebooks' default run_dir: the study's notebooks run on it under nbval
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")


def bib_keys() -> list[str]:
    return re.findall(r"^@\w+\{([^,\s]+),", (ROOT / "book" / "references.bib").read_text(), flags=re.M)


def cited_keys() -> dict[str, set[str]]:
    texts = {p.name: p.read_text() for p in (ROOT / "book").glob("*.md")}
    for p in (ROOT / "notebooks").glob("*.ipynb"):
        texts[p.name] = "\n".join(c.source for c in nbformat.read(p, 4).cells if c.cell_type == "markdown")
    return {name: {k.strip() for m in CITE.findall(text) for k in m.split(",")} for name, text in texts.items()}


def chromium_or_fail() -> str:
    try:
        return devtools.find_chromium()
    except devtools.ChromiumNotFound as exc:
        pytest.fail(f"{exc} (`make test` installs it)")


def test_bibliography_holds_the_thesis_references():
    keys = bib_keys()
    assert len(keys) == len(set(keys)), "duplicate bibtex keys"
    beyond = {"blau2018", "wang2004ssim", "dabov2007bm3d", "donoho1994", "hesterberg2015",  # not the thesis' own
              # the simulator's published values (notebook 10_realism)
              "liu2016", "schurmann2016", "steelman2017", "haseda2015", "kim2016lipid", "barer1952",
              "allencell_methods", "allen_sizescaling", "thomson1998", "becker2006", "rossmel1972", "facucho2009",
              "jakobs2014", "zhang2007", "wilhelm_clsm", "stewart2011",
              "esc_nucleolus2020", "weber2015", "jastrow_nucleolus", "proteinatlas_nucleoli",
              "lipman2023", "liu2023rectified", "li2025jit", "binkowski2018"}  # the flow family and KID (07d_flow)
    assert beyond <= set(keys)
    assert len(keys) == 31 + len(beyond)  # the thesis' 30 references and the thesis itself, and those
    assert SHARED_KEYS <= set(keys), sorted(SHARED_KEYS - set(keys))


def test_every_citation_is_in_the_bibliography():
    known = set(bib_keys())
    missing = {name: sorted(keys - known) for name, keys in cited_keys().items() if keys - known}
    assert not missing, f"cited but not in book/references.bib: {missing}"


def test_toc_points_at_real_files():
    for entry in pipeline.toc_entries(ROOT / "_toc.yml"):
        assert any((ROOT / entry).with_suffix(s).exists() for s in (".md", ".ipynb")), f"_toc.yml: {entry}"


def test_browser_check_catches_broken_pages(tmp_path):
    """A page with a missing image and one with a JavaScript error fail; a clean page passes."""
    html = tmp_path / "_build" / "html"
    html.mkdir(parents=True)
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
    (html / "dot.png").write_bytes(png)
    (html / "index.html").write_text('<html><body><main><h1>ok</h1><img src="dot.png"></main></body></html>')
    (html / "broken.html").write_text('<html><body><main><img src="missing/fig.png"></main></body></html>')
    (html / "throws.html").write_text("<html><body><main><script>undefinedFunction()</script></main></body></html>")
    found = browser.check_book(html, results_page=None, chromium=chromium_or_fail(), log=lambda s: None)
    reports = {r.page: r for r in found}
    assert reports["index.html"].errors == [] and reports["index.html"].images == 1
    assert any("missing/fig.png" in e for e in reports["broken.html"].errors)
    assert any("undefinedFunction" in e for e in reports["throws.html"].errors)
    assert all((tmp_path / "_build" / "screenshots" / f"{p[:-5]}.png").stat().st_size > 0 for p in reports)


def test_results_check_needs_table_confusion_matrices_viewer_and_collapsed_code():
    ok = {"text": "Table 4.1 ... Figure 4.1: confusion matrices", "tables": ["Channel Model SSIM MSE MAE PCC F1"],
          "loaded": 4, "viewers": [{"id": "vv-1"}], "hidden_inputs": 9}
    assert browser.check_results_page(ok) == []
    assert len(browser.check_results_page({**ok, "loaded": 1})) == 1  # the figures did not all load
    assert len(browser.check_results_page({**ok, "text": "Table 4.1 confusion"})) == 1  # no Figure 4.1
    assert browser.check_results_page({**ok, "viewers": []}) == ["results page: no 3D viewer (.vstain-viewer) "
                                                                 "of the test FOVs"]
    assert "hide-input" in browser.check_results_page({**ok, "hidden_inputs": 0})[0]
    assert len(browser.check_results_page({"text": "", "tables": [], "loaded": 0})) == 6


def start_quick_book() -> Background:
    """The quick book and the study's notebooks on it (quick-study) from an empty ``.test-runs/quick``
    (the tests' runs/), as one schedule of two notebooks at a time (the quick profile's ``jobs``), one
    CPU thread each (it shares the two cores with smoke-full and the unit tests), then the quick
    book's own HTML."""
    return pipeline_in_background("quick", first="quick-study")


def _statuses(timings) -> dict[str, str]:
    with open(timings) as fh:
        return {row["stage"]: row["status"] for row in csv.DictReader(fh)}


@pytest.mark.slow
@in_background(start_quick_book)
def test_quick_book_and_study_build_and_every_page_opens(request):
    """The whole chain at the quick profile from an empty run directory (so 04/05 train rather than
    resume a finished checkpoint), in .test-runs/quick (what the notebooks' default run_dir resolves to
    under the tests), then the study's notebooks at their defaults on that run (quick-study), each
    built into its own HTML under .test-runs/quick (never the user's book/_build), and every page of
    the study's book (the quick book's pages and the study's) opened in headless Chromium. The chain
    starts when collection ends (conftest.in_background). Every notebook then ran at its defaults,
    so the nbval pass of ``make test`` skips them (conftest.QUICK_BOOK_EXECUTED)."""
    rc, output = take_background(request).wait(timeout=1800)  # first: nothing may stop the test before it
    assert rc == 0, output[-6000:]
    chromium = chromium_or_fail()
    stems = [s.stem for s in pipeline.stages_from_toc(ROOT / "_toc.yml", ROOT)]
    study = _statuses(QUICK_BOOK / "timings_quick-study.csv")
    added = [s for s in study if s not in stems and s != "jupyter-book"]
    assert {study[s] for s in stems + added} == {"ran"}, study  # every notebook ran, from empty folders
    # the quick book's own run found them all done and only built its HTML
    assert [_statuses(QUICK_BOOK / "timings.csv").get(s) for s in stems] == ["skipped"] * len(stems)
    assert len(added) == len(pipeline.load_profile(ROOT / "profiles" / "quick-study.yaml").notebooks)
    QUICK_BOOK_EXECUTED.update(stems + added)
    assert (QUICK_BOOK / "book_src" / "_build" / "html" / "index.html").exists(), output[-3000:]
    html = QUICK_BOOK / "quick-study" / "_build" / "html"
    reports = browser.check_book(html, chromium=chromium)
    bad = {r.page: r.errors for r in reports if r.errors}
    assert not bad, bad
    pages = {r.page for r in reports}
    entries = [*pipeline.toc_entries(ROOT / "_toc.yml"), *(f"notebooks/{s}" for s in added)]
    assert {f"{entry}.html" for entry in entries} <= pages
    assert len(list((html.parent / "screenshots").glob("*.png"))) >= len(entries)
