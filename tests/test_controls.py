"""Controls of the realism measures: the truth blurred and shifted, written as model folders, and the
reading of each measure's response."""
import numpy as np
import pandas as pd
import pytest

from test_train import tiny_records
from vstain.evaluate.controls import (SHIFT, TRUTH, blur_name, blurred, control_findings, control_names,
                                      controls_sentence, shifted, write_controls)
from vstain.evaluate.metrics import pcc
from vstain.preprocess import processed
from vstain.volumes import read_volume, write_volume


def test_blur_removes_fine_detail_in_plane_only():
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(2, 5, 32, 32)).astype(np.float32)
    b = blurred(vol, 2.0)
    assert b.shape == vol.shape
    assert np.allclose(b.mean(axis=(2, 3)), vol.mean(axis=(2, 3)), atol=1e-4)  # no mixing across slices
    assert b.std() < 0.2 * vol.std()  # white noise loses most of its power


def test_shift_moves_the_structures_and_keeps_their_values():
    vol = np.zeros((1, 2, 16, 20), np.float32)
    vol[0, :, 2, 3] = 1
    s = shifted(vol, 0.25)
    assert s[0, 0, 6, 8] == 1 and s.sum() == vol.sum()
    assert np.array_equal(np.sort(s.ravel()), np.sort(vol.ravel()))


def test_controls_are_model_folders_and_resume(tmp_path):
    stage = tmp_path / "processed"
    processed.write_processed(stage, tiny_records(n_per=4, clean_truth=True))
    test = processed.read_manifest(stage).query("split == 'test'")
    dirs = write_controls(stage, tmp_path / "controls")
    assert list(dirs) == control_names() == [TRUTH, "blur 1", "blur 2", "blur 4", SHIFT]
    fov = test.iloc[0]
    truth = read_volume(fov["truth_path"])
    got = {name: read_volume(d / "predictions" / f"{fov['fov_id']}.tif") for name, d in dirs.items()}
    assert np.array_equal(got[TRUTH], truth)
    # the truth correlates less with itself the more it is blurred, and hardly at all once shifted
    r = [pcc(got[name][0], truth[0]) for name in ("blur 1", "blur 2", "blur 4")]
    assert 1 > r[0] > r[1] > r[2] and abs(pcc(got[SHIFT][0], truth[0])) < 0.3
    written = (dirs[SHIFT] / "predictions" / f"{fov['fov_id']}.tif").stat().st_mtime_ns
    write_controls(stage, tmp_path / "controls")
    assert (dirs[SHIFT] / "predictions" / f"{fov['fov_id']}.tif").stat().st_mtime_ns == written
    # a new simulation writes a new truth under the same FOV id: its controls are written again
    write_volume(fov["truth_path"], 2 * truth + 1)
    write_controls(stage, tmp_path / "controls")
    assert np.array_equal(read_volume(dirs[TRUTH] / "predictions" / f"{fov['fov_id']}.tif"), 2 * truth + 1)


def test_controls_need_the_clean_truth(tmp_path):
    stage = tmp_path / "processed"
    processed.write_processed(stage, tiny_records(n_per=4))
    manifest = stage / "manifest.csv"
    pd.read_csv(manifest).assign(truth_path="").to_csv(manifest, index=False)
    with pytest.raises(ValueError, match="no clean truth"):
        write_controls(stage, tmp_path / "controls")


def summary_row(metric, model, diff, decided, estimate, higher=True, label=None, n=8):
    return dict(metric=metric, reference="truth", model=model, estimate=estimate, diff=diff, decided=decided,
                higher_is_better=higher, label=label or metric.upper(), n=n)


def test_findings_tell_realism_from_correspondence_and_blindness():
    rows = []
    # PCC: blur and shift both cost -> correspondence
    for m, d, e in ((TRUTH, 0, 1), (blur_name(1), -.05, .95), (blur_name(2), -.2, .8), (blur_name(4), -.5, .5),
                    (SHIFT, -.9, .1)):
        rows.append(summary_row("pcc", m, d, m != TRUTH, e))
    # KID (lower is better): blur costs, the shift does not -> realism
    for m, d, e in ((TRUTH, 0, 0), (blur_name(1), .1, .1), (blur_name(2), .5, .5), (blur_name(4), 2, 2),
                    (SHIFT, .01, .01)):
        rows.append(summary_row("kid", m, d, m not in (TRUTH, SHIFT), e, higher=False))
    # F1clf: nothing decided -> blind to blur
    for m in (TRUTH, blur_name(1), blur_name(2), blur_name(4), SHIFT):
        rows.append(summary_row("f1clf", m, 0.0, False, 0.9, label="F1clf"))
    f = control_findings(pd.DataFrame(rows)).set_index("metric")
    assert f.loc["pcc", "judges"] == "correspondence" and f.loc["kid", "judges"] == "realism"
    assert f.loc["f1clf", "judges"] == "nothing of blur" and not f.loc["f1clf", "penalises_blur"]
    assert f.loc["pcc", "monotone_in_blur"] and f.loc["kid", "monotone_in_blur"]
    text = controls_sentence(f.reset_index())
    assert "KID gets worse under blur, and a sharp structure" in text and "F1clf does not get worse" in text
    # a small but decided cost of the shift, still better than the mildest blur: realism
    rows = [dict(r, decided=True) if (r["metric"] == "kid" and r["model"] == SHIFT) else r for r in rows]
    assert control_findings(pd.DataFrame(rows)).set_index("metric").loc["kid", "judges"] == "realism"
    assert "PCC gets worse under blur and under the shift" in text
    few = control_findings(pd.DataFrame(rows).assign(n=4))
    assert set(few["judges"]) == {"undecided"} and "fewer than 6 FOVs" in controls_sentence(few)


def test_kid_rows_and_the_display_table():
    from vstain.studies.controls import control_display, kid_rows
    kt = pd.DataFrame([dict(channel=c, model=m, kid=k, low=k - .1, high=k + .1, n=8, patches=40, diff=k,
                            diff_low=k - .1, diff_high=k + .1, decided=m != TRUTH and k > .1)
                       for c in ("all", "dna") for m, k in ((TRUTH, 0.0), (blur_name(4), 2.0), (SHIFT, 0.05))])
    rows = kid_rows(kt)
    assert len(rows) == 3 and set(rows["metric"]) == {"kid"} and not rows["higher_is_better"].any()
    pcc = ((TRUTH, 0, 1), (blur_name(4), -.5, .5), (SHIFT, -.9, .1))
    pcc_rows = pd.DataFrame([dict(summary_row("pcc", m, d, m != TRUTH, e), ci_low=e - .01, ci_high=e + .01,
                                  label="PCC") for m, d, e in pcc])
    t = control_display(pd.concat([pcc_rows, rows], ignore_index=True))
    assert list(t.columns) == [TRUTH, blur_name(4), SHIFT] and list(t.index) == ["PCC vs truth", "KID vs truth"]
    assert t.loc["KID vs truth", blur_name(4)].endswith("*") and not t.loc["KID vs truth", SHIFT].endswith("*")
    assert "(n = 8)" in t.loc["PCC vs truth", TRUTH]
