"""The ``smoke-full`` profile: the ``full`` profile's method settings run end to end on CPU.

The profile lays a few scale keys over ``full`` (vstain.book.profiles.SCALE_KEYS); the fast tests
check that layering and that nothing else of ``full`` changes; the slow one runs all notebooks and
builds the HTML in a subprocess, as ``make smoke-full`` does, so its pass or failure shows in
pytest's summary (~3 min on 2 cores; started in the background when collection ends).
"""
from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, TEST_RUNS, Background, in_background, pipeline_in_background, take_background

from vstain.book import pipeline, profiles
from vstain.book.profiles import ProfileError

SMOKE = ROOT / "profiles" / "smoke-full.yaml"
FULL = ROOT / "profiles" / "full.yaml"
RUN_DIR = TEST_RUNS / "smoke-full"


def _resolved(path):
    stages = pipeline.stages_from_toc(ROOT / "_toc.yml", ROOT)
    return pipeline.resolve_parameters(pipeline.load_profile(path), stages, "runs/x")


# --------------------------------------------------------------------------------------------
# The overlay changes only the scale of `full`
# --------------------------------------------------------------------------------------------
def test_smoke_overlay_sets_only_scale_keys():
    raw = yaml.safe_load(SMOKE.read_text())
    assert raw.pop("base") == "full"
    keys = {(section, key) for section, values in raw.items() for key in values}
    assert keys and all(key in profiles.SCALE_KEYS for _, key in keys), sorted(keys)
    assert ("all", "precision") not in keys


def test_smoke_run_keeps_every_method_value_of_full():
    full, smoke = _resolved(FULL), _resolved(SMOKE)
    assert full.keys() == smoke.keys()
    for stem in full:
        changed = {k for k in full[stem].keys() | smoke[stem].keys() if full[stem].get(k) != smoke[stem].get(k)}
        assert changed <= profiles.SCALE_KEYS, (stem, sorted(changed - profiles.SCALE_KEYS))
    # the thesis-scale settings the smoke run exists to exercise
    assert {smoke[s]["precision"] for s in ("03_denoising", "04_unet", "05_wgan", "06_classifier", "07_results")} \
        == {"bf16-mixed"}
    assert smoke["04_unet"]["base_width"] == smoke["05_wgan"]["base_width"] == smoke["05_wgan"]["critic_width"] == 64
    assert smoke["04_unet"]["optimizer"] == smoke["05_wgan"]["optimizer"] == "rmsprop"
    assert smoke["04_unet"]["lr"] == smoke["05_wgan"]["lr_generator"] == smoke["05_wgan"]["lr_critic"] == 5e-5
    assert smoke["05_wgan"]["init_from_unet"] is False
    assert smoke["06_classifier"]["arch"] == "resnet18"
    assert smoke["01_data"]["source"] == "synthetic" and smoke["04_unet"]["device"] == "cpu"
    assert all(v >= profiles.MIN_BATCH for s in smoke.values() for k, v in s.items() if k in profiles.BATCH_KEYS)


# --------------------------------------------------------------------------------------------
# Layering rules, on small profiles in tmp_path
# --------------------------------------------------------------------------------------------
BASE = """\
all:
  device: cuda  # shared
  precision: bf16-mixed  # shared
04_unet:
  base_width: 64  # method
  device: gpu  # a per-notebook value that a derived all: key must still replace
  crop: [32, 384, 384]  # scale
"""


@pytest.mark.parametrize(
    "derived, expected",
    [
        ("04_unet:\n  base_width: 8  # method\n", ["'04_unet: base_width'", "base profile 'b'", "scale keys"]),
        ("all:\n  precision: 32-true  # method\n", ["'all: precision'", "base profile 'b'"]),
        ("05_wgan:\n  n_critic: 1  # method\n", ["'05_wgan: n_critic'"]),
        ("04_unet:\n  batch_size: 1  # too small\n", ["'04_unet: batch_size'", "at least 2", "1"]),
        ("03_denoising:\n  n2v_batch_size: 2.5  # not an integer\n", ["'03_denoising: n2v_batch_size'", "2.5"]),
    ],
)
def test_a_derived_profile_that_changes_the_method_is_rejected(tmp_path, derived, expected):
    (tmp_path / "b.yaml").write_text(BASE)
    (tmp_path / "d.yaml").write_text("base: b  # the base\n" + derived)
    with pytest.raises(ProfileError) as err:
        profiles.load_profile(tmp_path / "d.yaml")
    for text in ["profile 'd'", *expected]:
        assert text in str(err.value)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"d.yaml": "base: nope  # missing\n"}, "profile 'nope': no file"),
        ({"d.yaml": "base: e  # a loop\n", "e.yaml": "base: d  # back\n"}, "comes back to itself"),
        ({"d.yaml": "base: [b]  # not a name\n"}, "'base' must name a profile"),
    ],
)
def test_a_bad_base_is_an_error(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ProfileError, match=expected):
        profiles.load_profile(tmp_path / "d.yaml")


def test_derived_values_replace_the_base_values_they_name(tmp_path):
    (tmp_path / "b.yaml").write_text(BASE)
    (tmp_path / "d.yaml").write_text(
        "base: b  # the base\nall:\n  device: cpu  # no GPU\n04_unet:\n  crop: [8, 16, 24]  # tiny\n"
        "05_wgan:\n  iterations: 3  # short\n")
    prof = profiles.load_profile(tmp_path / "d.yaml")
    assert prof.base == "b" and prof.name == "d"
    assert prof.common == {"device": "cpu", "precision": "bf16-mixed"}
    # the derived all: device also replaces the base's per-notebook device of 04_unet
    assert prof.sections == {"04_unet": {"base_width": 64, "crop": [8, 16, 24]}, "05_wgan": {"iterations": 3}}


# --------------------------------------------------------------------------------------------
# The run itself
# --------------------------------------------------------------------------------------------
def start_smoke_run() -> Background:
    """``make smoke-full``'s pipeline, from an empty run directory, on one CPU thread (it runs beside
    the quick book and the unit tests)."""
    return pipeline_in_background("smoke-full")


@pytest.mark.slow
@in_background(start_smoke_run)
def test_smoke_full_runs_every_notebook(request):
    """Every notebook at the full profile's method settings, a few steps each, and the HTML
    (``make smoke-full``), started when collection ends (conftest.in_background)."""
    rc, output = take_background(request).wait(timeout=1800)
    assert rc == 0, output[-6000:]
    stages = [s.stem for s in pipeline.stages_from_toc(ROOT / "_toc.yml", ROOT)]
    manifests = {s: json.loads((RUN_DIR / s / "manifest.json").read_text()) for s in stages}
    unet, wgan, clf = manifests["04_unet"], manifests["05_wgan"], manifests["06_classifier"]
    assert unet["generator_params"] == 23_092_678 and unet["global_step"] == 2  # thesis width, 2 steps
    assert wgan["iterations"] == 2 and wgan["params"]["n_critic"] == 5 and wgan["params"]["init_from_unet"] is False
    for m in (unet, wgan):
        assert m["params"]["precision"] == "bf16-mixed" and m["params"]["optimizer"] == "rmsprop"
        assert 0 < m["final_train_l1"] < 10 and 0 < m["final_val_l1"] < 10  # finite, not diverged
    assert clf["params"]["arch"] == "resnet18" and clf["params"]["precision"] == "bf16-mixed"
    assert manifests["03_denoising"]["params"]["precision"] == "bf16-mixed"
    assert (RUN_DIR / "07_results" / "table41.csv").exists()
    assert (RUN_DIR / "book_src" / "_build" / "html" / "index.html").exists()
