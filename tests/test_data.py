"""The Allen-layout loader (vstain.data.stage) against small hand-built local quilt3 registries.

Each registry follows the real package: ``metadata.csv`` with one row per cell (so FOVs repeat),
``outlier`` flags, per-row 0-based channel columns, and OME-TIFFs under ``fov_path/``. Channel
``c`` of a test FOV holds ``1000 * (c + 1) + z`` so every assembled channel can be traced back.
"""
import contextlib
import socket

import numpy as np
import pandas as pd
import pytest
import tifffile

from vstain import channels, volumes
from vstain.channels import TARGETS
from vstain.data import allen, stage

DEFAULT_CH = {"ChannelNumberBrightfield": 0, "ChannelNumberStruct": 1, "ChannelNumber405": 3, "ChannelNumber638": 2}
# A 7-channel FOV as in the real dataset: blank channels 0, 2, 5 and non-default positions.
SEVEN_CH = {"ChannelNumberBrightfield": 6, "ChannelNumberStruct": 1, "ChannelNumber405": 4, "ChannelNumber638": 3}
SHAPE = (5, 7, 9)  # Z, Y, X: odd and unequal


def write_ome(path, arr, axes="CZYX", pixel_size=(0.29, 0.108, 0.108), unit="µm"):
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"axes": axes}
    if pixel_size is not None:
        meta.update(PhysicalSizeZ=pixel_size[0], PhysicalSizeY=pixel_size[1], PhysicalSizeX=pixel_size[2],
                    PhysicalSizeZUnit=unit, PhysicalSizeYUnit=unit, PhysicalSizeXUnit=unit)
    tifffile.imwrite(path, arr, ome=True, metadata=meta)


def fov_stack(n_channels, blank=(), shape=SHAPE):
    z = np.arange(shape[0])[:, None, None]
    vol = np.stack([np.broadcast_to(1000 * (c + 1) + z, shape) for c in range(n_channels)]).astype(np.uint16)
    vol[list(blank)] = 0
    return vol


# (FOVId, gene, channels, channel columns, cells, outlier flags per cell, pixel size)
FOVS = [
    (11, "TOMM20", 4, DEFAULT_CH, 3, ["No", "No", "Yes"], (0.29, 0.108, 0.108)),
    (12, "TOMM20", 4, DEFAULT_CH, 1, ["No"], (0.29, 0.108, 0.108)),
    (13, "TOMM20", 7, SEVEN_CH, 2, ["No", "No"], (0.5, 0.2, 0.25)),
    (21, "LMNB1", 4, DEFAULT_CH, 2, ["No", "No"], (0.29, 0.108, 0.108)),
    (22, "LMNB1", 4, DEFAULT_CH, 1, ["Yes"], (0.29, 0.108, 0.108)),  # outlier only: never selected
    (31, "MYH10", 7, SEVEN_CH, 4, ["No"] * 4, (0.29, 0.108, 0.108)),
    (41, "FBL", 4, DEFAULT_CH, 1, ["No"], (0.29, 0.108, 0.108)),
    (42, "NPM1", 4, DEFAULT_CH, 1, ["No"], (0.29, 0.108, 0.108)),
]


def build_folder(root, fovs=FOVS, drop_column=None, override=None):
    rows = []
    for fid, gene, nch, cols, cells, outl, px in fovs:
        key = f"fov_path/{fid}_{gene}.ome.tiff"
        write_ome(root / key, fov_stack(nch, blank=[c for c in range(nch) if c not in cols.values()]), pixel_size=px)
        for cell in range(cells):
            rows.append({"CellId": fid * 100 + cell, "FOVId": fid, "structure_name": gene, "fov_path": key,
                         "outlier": outl[cell], **cols, **(override or {}).get(fid, {})})
    meta = pd.DataFrame(rows)
    if drop_column:
        meta = meta.drop(columns=drop_column)
    meta.to_csv(root / "metadata.csv", index=False)
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("allen")
    return allen.publish_local(build_folder(root / "src"), root / "registry")


def load(registry, n=1, structures=("TOMM20", "LMNB1", "MYH10", "FBL"), seed=0, **kw):
    return list(allen.load_fovs(registry, n_per_structure=n, structures=structures, seed=seed, cache_dir="unused", **kw))


def test_publish_local_browses_offline(registry):
    pkg = allen.open_package(registry)
    assert "metadata.csv" in pkg.keys() and registry.startswith("file://")
    assert pkg["fov_path"][f"13_TOMM20.ome.tiff"].physical_key.is_local()


def test_fov_table_dedups_and_drops_outliers(registry):
    meta = allen.read_metadata(allen.open_package(registry), "unused")
    assert len(meta) == sum(f[4] for f in FOVS)
    fovs = allen.fov_table(meta)
    assert list(fovs["fov_id"]) == ["11", "12", "13", "21", "31", "41", "42"]  # 22 is an outlier
    assert dict(zip(fovs["fov_id"], fovs["cells"])) == {"11": 2, "12": 1, "13": 2, "21": 2, "31": 4, "41": 1, "42": 1}
    assert fovs.set_index("fov_id").loc["42", "structure"] == "nucleoli"  # NPM1, the alternative marker


@pytest.mark.filterwarnings("ignore:structure")
@pytest.mark.parametrize("fid, nch, cols", [(11, 4, DEFAULT_CH), (13, 7, SEVEN_CH), (31, 7, SEVEN_CH)])
def test_channels_come_from_the_metadata_columns(registry, fid, nch, cols):
    fov = {f.fov_id: f for f in load(registry, n=3)}[str(fid)]
    structure = channels.DEFAULT_GENE_MAP[fov.gene]
    z = np.arange(SHAPE[0])[:, None, None]
    assert fov.bf.shape == (1, *SHAPE) and fov.target.shape == (6, *SHAPE)
    assert fov.bf.dtype == fov.target.dtype == np.float32
    expect = {"dna": cols["ChannelNumber405"], "membrane": cols["ChannelNumber638"],
              structure: cols["ChannelNumberStruct"]}
    for name in TARGETS:
        ch = fov.target[TARGETS.index(name)]
        if name in expect:
            np.testing.assert_array_equal(ch, np.broadcast_to(1000 * (expect[name] + 1) + z, SHAPE))
        else:
            assert np.isnan(ch).all(), name
    np.testing.assert_array_equal(fov.bf[0], np.broadcast_to(1000 * (cols["ChannelNumberBrightfield"] + 1) + z, SHAPE))
    assert fov.truth is None and fov.focus_z is None


@pytest.mark.filterwarnings("ignore:structure")
def test_pixel_sizes_from_ome_metadata(registry, tmp_path):
    fovs = {f.fov_id: f for f in load(registry, n=3)}
    assert fovs["13"].pixel_size == pytest.approx((0.5, 0.2, 0.25))
    assert fovs["11"].pixel_size == pytest.approx((0.29, 0.108, 0.108))
    write_ome(tmp_path / "nm.tif", fov_stack(4), pixel_size=(290, 108, 108), unit="nm")
    assert volumes.read_ome(tmp_path / "nm.tif")[1] == pytest.approx((0.29, 0.108, 0.108))


def test_selection_is_seeded_and_per_structure(registry):
    ids = lambda seed, n: [f.fov_id for f in load(registry, n=n, structures=("TOMM20",), seed=seed)]  # noqa: E731
    assert ids(0, 2) == ids(0, 2)
    assert {tuple(ids(s, 2)) for s in range(8)} != {tuple(ids(0, 2))}  # other seeds draw other pairs
    assert sorted(ids(0, 3)) == ["11", "12", "13"]
    counts = pd.Series([f.gene for f in load(registry, n=1, structures=("TOMM20", "LMNB1", "NPM1"))]).value_counts()
    assert counts.to_dict() == {"TOMM20": 1, "LMNB1": 1, "NPM1": 1}
    with pytest.warns(UserWarning, match="only 1 FOVs"):
        assert len(load(registry, n=2, structures=("LMNB1",))) == 1  # 22 is an outlier


def test_allen_stage_from_a_local_registry(registry, tmp_path):
    df = stage.run_data_stage(tmp_path, source="allen", registry=registry, n_per_structure=1, seed=3)
    back = stage.read_fovs(tmp_path)
    assert list(back["fov_id"]) == list(df["fov_id"]) and len(df) == 4
    assert set(back.columns) >= {"fov_id", "gene", "structure", "path", "truth_path", "focus_z_lo", "focus_z_hi",
                                 "pixel_size_z", "pixel_size_y", "pixel_size_x"}
    for _, row in back.iterrows():
        fov = stage.read_stage_fov(row)
        bf, target, truth = fov.bf, fov.target, fov.truth
        assert bf.shape == (1, *SHAPE) and target.shape == (6, *SHAPE) and truth is None
        carried = ~np.isnan(target).all(axis=(1, 2, 3))
        assert carried.sum() == 3 and carried[:2].all() and carried[TARGETS.index(row["structure"])]
        assert row["truth_path"] == "" and pd.isna(row["focus_z_lo"])


def test_center_crop_yx(registry, tmp_path):
    df = stage.run_data_stage(tmp_path, source="allen", registry=registry, n_per_structure=1, crop_yx=(3, 6))
    fov = stage.read_stage_fov(stage.read_fovs(tmp_path).iloc[0])
    assert fov.bf.shape == (1, SHAPE[0], 3, 6) and fov.target.shape == (6, SHAPE[0], 3, 6) and len(df) == 4
    with pytest.raises(ValueError, match=r"crop_yx \(8, 6\) does not fit FOV 1\d of 7 x 9"):
        stage.run_data_stage(tmp_path, source="allen", registry=registry, n_per_structure=1, crop_yx=(8, 6))


def test_plots_draw_a_stage(registry, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from vstain.plots import data as plots

    stage.run_data_stage(tmp_path, source="allen", registry=registry, n_per_structure=1)
    fovs = stage.read_fovs(tmp_path)
    samples, carried = stage.stage_summary(fovs, voxels_per_fov=50)
    assert carried.shape == (4, 6) and carried.sum() == 12 and set(samples["mito"]) == {"TOMM20"}
    fov = stage.read_stage_fov(fovs.iloc[2])
    figs = [plots.fov_gallery(fov.bf, fov.target, fov.pixel_size, "t", focus_z=(1, 3)),
            plots.intensity_histograms(samples), plots.label_matrix(fovs, carried),
            plots.brightfield_through_focus(fov.bf, fov.pixel_size, "t", n=3)]
    # 18: seven XY and seven XZ panels and a colour bar per carried channel (brightfield, DNA, membrane, the tag)
    assert [len(f.axes) for f in figs] == [18, 8, 1, 4]  # 4: three slices and a colour bar
    matplotlib.pyplot.close("all")


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file or parameter and the problem
# ---------------------------------------------------------------------------------------------
def test_missing_channel_column(tmp_path):
    uri = allen.publish_local(build_folder(tmp_path / "src", drop_column="ChannelNumber638"), tmp_path / "reg")
    with pytest.raises(ValueError, match=r"metadata.csv: missing column.*ChannelNumber638"):
        load(uri)


def test_channel_index_out_of_range(tmp_path):
    override = {21: {"ChannelNumberStruct": 4}}  # a 4-channel file: valid 0..3
    uri = allen.publish_local(build_folder(tmp_path / "src", override=override), tmp_path / "reg")
    with pytest.raises(ValueError, match=r"21_LMNB1.ome.tiff: 'ChannelNumberStruct' = 4 is out of range .* 4 channels"):
        load(uri, structures=("LMNB1",))


def test_empty_channel_index(tmp_path):
    override = {41: {"ChannelNumber405": np.nan}}
    uri = allen.publish_local(build_folder(tmp_path / "src", override=override), tmp_path / "reg")
    with pytest.raises(ValueError, match=r"41_FBL.ome.tiff: FOV 41 has no valid 'ChannelNumber405'"):
        load(uri, structures=("FBL",))


@pytest.mark.parametrize("shape, axes, match", [
    ((4, 7, 9), "CYX", "no Z axis"),                        # 2D multi-channel
    ((7, 9), "YX", "no Z axis"),                            # 2D single plane
    ((2, 4, 5, 7, 9), "TCZYX", r"extra axes \{'T': 2\}"),  # 5D time series
])
def test_not_a_zyx_stack(tmp_path, shape, axes, match):
    f = tmp_path / "bad.ome.tif"
    write_ome(f, np.ones(shape, np.uint16), axes=axes)
    with pytest.raises(ValueError, match=rf"bad.ome.tif: a {len(shape)}D image .*{match}"):
        volumes.read_ome(f)


def test_single_channel_zyx_is_a_stack(tmp_path):
    write_ome(tmp_path / "z.ome.tif", np.ones((5, 7, 9), np.uint16), axes="ZYX")
    assert volumes.read_ome(tmp_path / "z.ome.tif")[0].shape == (1, 5, 7, 9)


@pytest.mark.parametrize("keep", [0.5, 0.9, 100, 0])
def test_truncated_or_corrupt_tiff(tmp_path, keep):
    good = tmp_path / "good.ome.tif"
    write_ome(good, fov_stack(4))
    raw = good.read_bytes()
    bad = tmp_path / "bad.ome.tif"
    bad.write_bytes(raw[: int(keep * len(raw)) if keep <= 1 else keep] if keep else b"not a tiff" * 20)
    with pytest.raises(ValueError, match=r"bad.ome.tif: .*(truncated or corrupt|not a readable TIFF)"):
        volumes.read_ome(bad)


def test_corrupt_file_in_a_registry_names_it(tmp_path):
    uri = allen.publish_local(build_folder(tmp_path / "src"), tmp_path / "reg")
    f = tmp_path / "reg" / channels.ALLEN_PACKAGE / "fov_path" / "41_FBL.ome.tiff"
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(ValueError, match="41_FBL.ome.tiff: .*truncated or corrupt"):
        load(uri, structures=("FBL",))


def test_unknown_structure_name(registry):
    with pytest.raises(ValueError, match=r"unknown structure name\(s\) \['SEC61B'\].*gene map knows"):
        load(registry, structures=("TOMM20", "SEC61B"))
    with pytest.raises(ValueError, match="unknown target"):
        load(registry, gene_map={"TOMM20": "golgi"})


def test_unknown_structure_fails_before_any_network():
    with pytest.raises(ValueError, match="unknown structure"):
        stage.run_data_stage("unused", source="allen", structures=("XYZ",))


def test_missing_local_registry(tmp_path):
    with pytest.raises(allen.RegistryUnreachableError, match="holds no package"):
        load(tmp_path / "nowhere")


@pytest.fixture
def no_network(monkeypatch):
    """Outbound sockets blocked: any connect that is not AF_UNIX raises."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family != socket.AF_UNIX:
            raise OSError(f"network blocked by the test: connect to {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, a: connect(self, a))


def test_s3_registry_unreachable(no_network):
    with pytest.raises(allen.RegistryUnreachableError, match="needs network access.*'synthetic'.*offline"):
        load(channels.ALLEN_REGISTRY, timeout=1.0)


def test_bad_source_and_registry_for_synthetic():
    with pytest.raises(ValueError, match="source must be one of"):
        stage.run_data_stage("unused", source="allencell")
    with pytest.raises(ValueError, match="registry must be None"):
        stage.run_data_stage("unused", source="synthetic", registry="s3://allencell")


# ---------------------------------------------------------------------------------------------
# The default path: simulator -> local registry -> the same loader, with the network blocked
# ---------------------------------------------------------------------------------------------
def test_simulated_stage_offline(tmp_path, no_network):
    pytest.importorskip("vstain.data.simulate")
    shape = (32, 38, 45)
    df = stage.run_data_stage(tmp_path, source="synthetic", n_per_structure=1, shape=shape,
                             pixel_size=(0.6, 0.31, 0.29), seed=1)
    assert sorted(df["gene"]) == sorted(channels.DEFAULT_STRUCTURES)
    assert (tmp_path / "registry").is_dir() and (tmp_path / stage.FOVS_CSV).is_file()
    back = stage.read_fovs(tmp_path)
    for _, row in back.iterrows():
        fov = stage.read_stage_fov(row)
        bf, target, truth = fov.bf, fov.target, fov.truth
        assert bf.shape == (1, *shape) and target.shape == (6, *shape) and truth.shape == (6, *shape)
        carried = ~np.isnan(target).all(axis=(1, 2, 3))
        expect = [t for t in TARGETS if t in ("dna", "membrane", row["structure"])]
        assert [TARGETS[i] for i in np.flatnonzero(carried)] == expect
        assert not np.isnan(truth).any()
        assert 0 <= row["focus_z_lo"] < row["focus_z_hi"] <= shape[0]
        assert (row["pixel_size_z"], row["pixel_size_y"], row["pixel_size_x"]) == pytest.approx((0.6, 0.31, 0.29))


# ---------------------------------------------------------------------------------------------
# Silent bad inputs: blank channels and images that are not uint16
# ---------------------------------------------------------------------------------------------
def fov_row(fov_id="41", structure="nucleoli", cols=DEFAULT_CH):
    return pd.Series({"fov_id": fov_id, "structure": structure, **cols})


def test_blank_target_channel_warns_and_is_not_carried(tmp_path):
    override = {13: {"ChannelNumberStruct": 5}}  # FOV 13's channel 5 is blank (all zeros)
    uri = allen.publish_local(build_folder(tmp_path / "src", override=override), tmp_path / "reg")
    with pytest.warns(UserWarning, match=r"13_TOMM20.ome.tiff: target channel 'mito' \(ChannelNumberStruct = 5\) "
                                         r"of FOV 13 is blank \(every voxel 0\); treated as not carried"):
        fovs = {f.fov_id: f for f in load(uri, n=3, structures=("TOMM20",))}
    carried = {fid: [n for n, ch in zip(TARGETS, f.target) if not np.isnan(ch).all()] for fid, f in fovs.items()}
    assert carried == {"11": ["dna", "membrane", "mito"], "12": ["dna", "membrane", "mito"], "13": ["dna", "membrane"]}
    assert (fovs["13"].target[TARGETS.index("dna")] == 1000 * 5 + np.arange(SHAPE[0])[:, None, None]).all()


@pytest.mark.parametrize("blank, match", [
    ([0], r"the brightfield channel \(ChannelNumberBrightfield = 0\) of FOV 41 is blank"),
    ([1, 2, 3], r"FOV 41 has no target channel with signal"),
])
def test_blank_brightfield_or_no_target_is_an_error(blank, match):
    vol = fov_stack(4, blank=blank)
    with pytest.warns(UserWarning) if len(blank) > 1 else contextlib.nullcontext():
        with pytest.raises(ValueError, match=rf"fov_path/41_FBL.ome.tiff: {match}"):
            allen.assemble(vol, fov_row(), "fov_path/41_FBL.ome.tiff")


@pytest.mark.parametrize("dtype, convert", [
    (np.float64, lambda v: v / 5000),  # normalised to [0, 1]
    (np.uint8, lambda v: v % 256),  # 8-bit
    (np.float32, lambda v: v),  # counts as float
])
def test_image_that_is_not_uint16_is_an_error_unless_allowed(tmp_path, dtype, convert):
    f = tmp_path / "fov_path" / "41_FBL.ome.tiff"
    write_ome(f, convert(fov_stack(4)).astype(dtype))
    vol = volumes.read_ome(f)[0]
    name = np.dtype(dtype).name
    with pytest.raises(ValueError, match=rf"41_FBL.ome.tiff: image dtype {name}, expected one of \('uint16',\)"):
        allen.assemble(vol, fov_row(), f)
    bf, target = allen.assemble(vol, fov_row(), f, dtypes=(name, "uint16"))
    assert bf.shape == (1, *SHAPE) and np.allclose(bf[0], vol[0], rtol=1e-6)
    assert np.allclose(target[TARGETS.index("nucleoli")], vol[1], rtol=1e-6)
    assert allen.assemble(vol, fov_row(), f, dtypes=None)[0].dtype == np.float32
