"""The prediction figures' drawing rules: one display range per channel shared by the truth, the
target and every model (unlabelled channels included), a colour bar per channel, a µm scale bar,
and XZ sections at the true voxel aspect."""
import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from vstain.channels import TARGETS
from vstain.plots import results, views, wgan
from vstain.plots.models import plot_prediction

VOXEL = (0.5, 0.3, 0.25)  # anisotropic on purpose: z/x = 2, y/x = 1.2
NOLABEL = TARGETS.index("envelope")


@pytest.fixture(scope="module")
def fov():
    """An odd-sized FOV ``[C, 9, 17, 23]``: truth, a target without the envelope label, and two
    models whose intensities differ by a factor of 8."""
    rng = np.random.default_rng(3)
    truth = rng.gamma(0.7, size=(6, 9, 17, 23)).astype(np.float32)
    target = (truth + 0.2 * rng.normal(size=truth.shape)).astype(np.float32)
    target[NOLABEL] = np.nan
    bf = rng.normal(size=(1, 9, 17, 23)).astype(np.float32)
    preds = {"faint": 0.5 * truth, "bright": 4.0 * truth}
    return bf, target, truth, preds


def _images(ax):
    return [im for im in ax.images if im.get_cmap().name == "magma"]


def _scale_bars(fig):
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == views.SCALE_BAR_GID]


def test_display_range_follows_truth_then_target_then_predictions():
    rng = np.random.default_rng(0)
    truth, target, pred = rng.normal(size=(3, 5, 7, 11))
    expect = tuple(np.percentile(truth, views.PERCENTILES))
    assert views.display_range(truth, target, [pred]) == pytest.approx(expect)
    assert views.display_range(None, target, [pred]) == pytest.approx(np.percentile(target, views.PERCENTILES))
    union = np.concatenate([pred.ravel(), 3 * pred.ravel()])
    got = views.display_range(None, np.full_like(target, np.nan), [pred, 3 * pred])
    assert got == pytest.approx(np.percentile(union, views.PERCENTILES))
    with pytest.raises(ValueError, match="no finite values"):
        views.display_range(None, np.full((2, 3), np.nan), [])


@pytest.mark.parametrize("view", ["xy", "xz"])
def test_comparison_shares_one_range_per_channel(fov, view):
    bf, target, truth, preds = fov
    fig = wgan.plot_comparison(bf, target, preds, truth, view=view, voxel_size_zyx=VOXEL)
    axes = np.array(fig.axes[:4 * 7]).reshape(4, 7)  # rows: target, truth, faint, bright
    for c in range(len(TARGETS)):
        expect = views.display_range(truth[c], target[c], [p[c] for p in preds.values()])
        column = [im for ax in axes[:, c + 1] for im in _images(ax)]
        assert len(column) == (3 if c == NOLABEL else 4)  # the unlabelled target panel is grey
        for im in column:
            assert im.get_clim() == pytest.approx(expect)
        # one colour bar per channel, in z-score units, on that shared range
        bars = {id(im.colorbar) for im in column if im.colorbar is not None}
        assert len(bars) == 1
        cb = next(im.colorbar for im in column if im.colorbar is not None)
        assert cb.ax.get_xlabel() == views.COLORBAR_LABEL
    # the unlabelled channel's own prediction range differs from the truth's, so the check above can fail
    assert views.display_range(truth[NOLABEL]) != views.display_range(None, None, [preds["bright"][NOLABEL]])
    assert len(_scale_bars(fig)) == 1
    want = VOXEL[0] / VOXEL[2] if view == "xz" else VOXEL[1] / VOXEL[2]
    assert all(ax.get_aspect() == pytest.approx(want) for ax in axes.ravel() if ax.images)
    plt.close(fig)


def test_prediction_without_truth_uses_the_target_then_the_prediction(fov):
    bf, target, _, preds = fov
    pred = preds["bright"]
    fig = plot_prediction(bf, target, pred, None, view="xz", voxel_size_zyx=VOXEL)
    axes = np.array(fig.axes[:2 * 7]).reshape(2, 7)
    assert _images(axes[1, 1 + NOLABEL])[0].get_clim() == pytest.approx(
        np.percentile(pred[NOLABEL], views.PERCENTILES))
    assert _images(axes[1, 1])[0].get_clim() == pytest.approx(np.percentile(target[0], views.PERCENTILES))
    assert axes[0, 0].get_aspect() == pytest.approx(VOXEL[0] / VOXEL[2])
    plt.close(fig)


def test_figure_4_2_and_gallery_agree_on_every_channel(fov):
    """The same FOV and model draw each channel in one range in Figure 4.2 and 4.3, unlabelled
    channels included, whatever the model's scale."""
    bf, target, truth, preds = fov
    fig2 = results.input_and_prediction(bf, preds["bright"], "4.2", voxel_size_zyx=VOXEL, target=target, truth=truth)
    fig3 = results.gallery(["a", "b"], [target, target], [preds["bright"], preds["faint"]], "4.3",
                           voxel_size_zyx=VOXEL, truths=[truth, truth])
    clim2 = [im.get_clim() for ax in fig2.axes for im in _images(ax)]
    assert len(clim2) == len(TARGETS)
    grid = np.array([ax for ax in fig3.axes if ax.get_label() != "<colorbar>"]).reshape(2 * len(TARGETS), 2)
    for c in range(len(TARGETS)):
        expect = views.display_range(truth[c])
        assert clim2[c] == pytest.approx(expect)
        for j in range(2):
            ims = _images(grid[2 * c, j]) + _images(grid[2 * c + 1, j])
            assert len(ims) == (1 if c == NOLABEL else 2)
            assert all(im.get_clim() == pytest.approx(expect) for im in ims)
            assert ims[-1].colorbar is not None and ims[-1].colorbar.ax.get_ylabel() == views.COLORBAR_LABEL
    for fig in (fig2, fig3):
        assert len(_scale_bars(fig)) == 1
        assert all(ax.get_aspect() == pytest.approx(VOXEL[1] / VOXEL[2]) for ax in fig.axes if _images(ax))
        plt.close(fig)


def test_scale_length_is_round_and_at_most_a_fifth():
    for width, expect in [(28.8, 5.0), (99.8, 10.0), (7.0, 1.0), (0.9, 0.1), (250.0, 50.0)]:
        assert views.scale_length(width) == pytest.approx(expect)


def test_voxel_size_reads_fovs_csv(tmp_path):
    cols = {"fov_id": ["a", "b"], "pixel_size_z": [0.29, 0.29], "pixel_size_y": [0.108] * 2, "pixel_size_x": [0.108] * 2}
    pd.DataFrame(cols).to_csv(tmp_path / "fovs.csv", index=False)
    assert views.voxel_size(tmp_path) == (0.29, 0.108, 0.108)
    pd.DataFrame({**cols, "pixel_size_z": [0.29, 0.5]}).to_csv(tmp_path / "fovs.csv", index=False)
    with pytest.raises(ValueError, match="2 different voxel sizes"):
        views.voxel_size(tmp_path)
    with pytest.raises(FileNotFoundError, match="01_data"):
        views.voxel_size(tmp_path / "missing")


def test_bad_view_and_voxel_size_are_errors(fov):
    bf, target, truth, preds = fov
    with pytest.raises(ValueError, match="view must be"):
        wgan.plot_comparison(bf, target, preds, truth, view="yz", voxel_size_zyx=VOXEL)
    with pytest.raises(ValueError, match="voxel_size_zyx"):
        plot_prediction(bf, target, preds["faint"], truth, voxel_size_zyx=(0.3, 0.3))
    plt.close("all")


def test_learning_curves_show_fine_tunes_on_their_own_linear_axis():
    from vstain.plots.curves import fine_tune_starts, learning_curves

    rows = [{"model": m, "step": s, "wall_s": 2.0 * s, "metric": k, "channel": "all", "mean": 0.5, "low": 0.4,
             "high": 0.6, "n": 8}
            for m, steps in (("U-Net", (47, 1500)), ("fine-tune", (1512, 1650)))
            for s in steps for k in ("pcc", "kid")]
    table = pd.DataFrame(rows)
    snaps = pd.DataFrame({"model": ["U-Net", "fine-tune"], "step": [1500, 150], "start_step": [0, 1500]})
    assert fine_tune_starts(snaps) == {"fine-tune": 1500} and fine_tune_starts(None) == {}
    fig = learning_curves(table, metrics=("pcc", "kid"))
    assert len(fig.axes) == 4  # no snapshots given: steps and wall time only
    fig = learning_curves(table, snaps, metrics=("pcc", "kid"))
    assert len(fig.axes) == 6
    line = fig.axes[4].get_lines()[0]  # third row, first panel: the fine-tune alone, steps after its start
    assert line.get_label() == "fine-tune" and list(line.get_xdata()) == [12, 150]
    assert fig.axes[4].get_xscale() == "linear" and fig.axes[0].get_xscale() == "log"
    plt.close("all")


def test_learning_curves_draw_a_metric_without_any_value():
    """A KID from too few patches is NaN at every snapshot (tiny runs): its panels say so and the
    figure still saves (an empty log axis would not draw)."""
    from vstain.plots.curves import learning_curves

    table = pd.DataFrame([{"model": "U-Net", "step": s, "wall_s": 1.0 * s, "metric": k, "channel": "all",
                           "mean": np.nan if k == "kid" else 0.5, "low": np.nan, "high": np.nan, "n": 4}
                          for s in (1, 2) for k in ("pcc", "kid")])
    fig = learning_curves(table, metrics=("pcc", "kid"))
    fig.savefig(io.BytesIO(), format="png", bbox_inches="tight")
    kid = fig.axes[1]
    assert kid.get_xscale() == "linear" and "no value" in kid.texts[0].get_text()
    assert fig.axes[0].get_xscale() == "log" and not fig.axes[0].texts
    plt.close("all")
