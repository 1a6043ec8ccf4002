"""The whole-volume (3-D) path: preset, map resampling back onto the scan, the 3-D score network,
voxel maps of MSMA, and the CLI end to end on a tiny 3-D config with lesions."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet
from neuro_ood.config import PreprocessingConfig, load_config
from neuro_ood.data.synthetic import write_synthetic_cohort
from neuro_ood.detectors import build_detector
from neuro_ood.preprocessing.inverse import box_to_scan_grid, scan_to_box_grid
from neuro_ood.preprocessing.presets import T1VolumePreprocessor, preprocessing_fingerprint

from .conftest import invoke, set_args

TINY_3D = [
    "preprocessing.spacing_mm=[4.0, 4.0, 4.0]",
    "preprocessing.volume_size=[40, 48, 40]",
    "model.channels=[4, 8, 16, 16]",
    "training.steps=3",
    "training.batch_size=2",
    "training.checkpoint_every=3",
    "msma.bands=3",
    "msma.voxel_images=2",
    "msma.voxel_samples=200",
    "msma.voxel_components=2",
    "scorers.gmm={n_components: [1, 2], cv: 3, n_jobs: 1}",
    "scorers.maf={epochs: 2, hidden_features: 16}",
    "scorers.knn={n_neighbors: 3}",
]


def _cube_scan(path, orientation: str):
    """A 2 mm head-like ellipsoid with a bright cube at a known world position, stored in
    ``orientation`` (RAS or LPS); returns the cube's world centre (mm)."""
    shape = (60, 70, 60)
    ijk = np.indices(shape).astype(np.float32)
    centre = (np.array(shape) - 1) / 2
    inside = (((ijk - centre[:, None, None, None]) / np.array([22, 28, 22])[:, None, None, None]) ** 2).sum(0) < 1
    data = np.where(inside, 500.0, 0.0).astype(np.float32)
    data[36:42, 40:46, 30:36] = 1000.0   # the cube, off centre in x and y
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -centre * 2
    if orientation == "LPS":
        data = data[::-1, ::-1].copy()
        affine = affine @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data, affine


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_volume_preset_and_map_round_trip(tmp_path, orientation):
    data, affine = _cube_scan(tmp_path / "scan.nii.gz", orientation)
    pre = T1VolumePreprocessor(PreprocessingConfig(preset="t1_volume", volume_size=[48, 56, 48],
                                                   intensity_percentiles=[0.0, 100.0]))
    arrays = pre.arrays(tmp_path / "scan.nii.gz")
    volume = arrays["slices"]
    assert volume.shape == (1, 1, 48, 56, 48) and 0 <= volume.min() and volume.max() <= 1
    # In the box (RAS), the cube is the brightest part; a map of it must land on the cube in the file's grid.
    box_map = (volume[0, 0] > 0.9).astype(np.float32)
    on_scan = box_to_scan_grid(box_map, arrays["box_to_scan"], data.shape, affine) > 0.5
    cube = data > 900
    dice = 2 * (on_scan & cube).sum() / (on_scan.sum() + cube.sum())
    assert dice > 0.8
    # And the other way: the scan's cube as a mask lands on the box's bright voxels.
    back = scan_to_box_grid(cube, affine, volume.shape[2:], arrays["box_to_scan"]) > 0.5
    assert 2 * (back & (box_map > 0)).sum() / (back.sum() + box_map.sum()) > 0.8


def test_volume_size_in_the_volume_fingerprint_only():
    slices = PreprocessingConfig(preset="t1")
    assert preprocessing_fingerprint(slices) == preprocessing_fingerprint(
        PreprocessingConfig(preset="t1", volume_size=[8, 8, 8]))
    volume = PreprocessingConfig(preset="t1_volume")
    assert preprocessing_fingerprint(volume) != preprocessing_fingerprint(
        PreprocessingConfig(preset="t1_volume", volume_size=[8, 8, 8]))


def test_3d_score_network_shapes_and_sigma_dependence():
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(spatial_dims=3, in_channels=1, backbone="cond_unet", channels=(4, 8, 16),
                                   strides=(2, 2), num_res_units=0)
    for module in net.modules():   # FiLM starts at zero (a plain instance norm); give it weights
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.5)
    x = torch.rand(2, 1, 12, 16, 20)
    with torch.no_grad():
        high = net(x, torch.full((2,), float(net.sigmas[0])))
        low = net(x, torch.full((2,), float(net.sigmas[-1])))
    assert high.shape == x.shape
    assert (high - low).abs().mean() > 1e-3


@pytest.mark.parametrize("name", ["msma3d_quick", "msma3d_abcd"])
def test_shipped_3d_configs_build_a_network_their_box_fits(name):
    """The box of each 3-D config is divisible by the product of its strides, and its network
    (built as training would build it) maps a volume of that divisibility to the same shape."""
    from neuro_ood.networks import build_network

    cfg = load_config(name)
    factor = int(np.prod(cfg.model.strides))
    assert all(size % factor == 0 for size in cfg.preprocessing.volume_size)
    net = build_network(cfg, in_channels=1, spatial_dims=3).eval()
    assert len(net.sigmas) == 10
    x = torch.rand(1, 1, factor, factor, 2 * factor)   # the smallest volume the strides allow
    with torch.no_grad():
        assert net(x, net.sigmas[:1]).shape == x.shape


@pytest.mark.parametrize("voxel_model", ["gmm", "normative"])
def test_msma_3d_voxel_maps_and_tail_score(tmp_path, voxel_model):
    cfg = load_config("msma3d_quick", TINY_3D + [f"msma.voxel_model={voxel_model}"])
    detector = build_detector(cfg, "cpu")
    rng = np.random.default_rng(0)
    x = np.zeros((4, 1, 16, 16, 16), np.float32)
    x[:, :, 3:13, 3:13, 3:13] = 0.6 + 0.05 * rng.standard_normal((4, 1, 10, 10, 10))
    detector.fit(x)
    scores = detector.score_samples(x)
    assert "voxel_tail" in scores and scores["voxel_tail"].shape == (4,)
    heat = detector.maps(x)
    assert heat.shape == (4, 16, 16, 16) and (heat >= 0).all()
    assert (heat[:, 0, 0, 0] == 0).all()      # background: no map
    assert ("SD" if voxel_model == "normative" else "nats") in detector.map_unit   # the overlay's unit label
    detector.save(tmp_path)
    again = type(detector).load(tmp_path, "cpu")
    np.testing.assert_allclose(again.maps(x), heat, rtol=1e-5, atol=1e-5)
    if voxel_model == "normative":
        odd = x[:1].copy()
        odd[0, 0, 5:8, 5:8, 5:8] = 0.95                   # brighter than every inlier there
        combined, parts = again.maps_with_components(odd)
        np.testing.assert_allclose(combined, again.maps(odd), rtol=1e-5, atol=1e-5)
        assert set(parts) == {"image", "residual"}
        image_only = parts["image"][0]
        assert np.unravel_index(image_only.argmax(), image_only.shape) in {(i, j, k) for i in range(5, 8)
                                                                           for j in range(5, 8) for k in range(5, 8)}
        assert again.score_samples(odd)["voxel_tail"][0] < scores["voxel_tail"].min()
        again.cfg.msma.voxel_smooth = 0.0   # unsmoothed, each kind weighs the same: the RMS of the parts
        combined, parts = again.maps_with_components(odd)
        np.testing.assert_allclose(combined ** 2, (parts["image"] ** 2 + parts["residual"] ** 2) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("voxel_model", ["norm", "gmm", "normative"])
def test_msma_score_and_maps_give_both_from_one_voxel_pass(monkeypatch, voxel_model):
    """Scores, maps and the map's parts from ``score_and_maps`` equal those of ``score_samples``,
    ``maps`` and ``maps_with_components``; with a voxel model its map is made once per chunk,
    not once for ``voxel_tail`` and again for the map."""
    cfg = load_config("msma3d_quick", TINY_3D + [f"msma.voxel_model={voxel_model}", "training.feature_batch_size=2"])
    detector = build_detector(cfg, "cpu")
    rng = np.random.default_rng(1)
    x = np.zeros((3, 1, 16, 16, 16), np.float32)
    x[:, :, 3:13, 3:13, 3:13] = 0.6 + 0.05 * rng.standard_normal((3, 1, 10, 10, 10))
    detector.fit(x)
    x[2, 0, 5:8, 5:8, 5:8] = 0.95
    scores, heat, parts = detector.score_and_maps(x, components=True)
    expected_heat, expected_parts = detector.maps_with_components(x)
    for name, values in detector.score_samples(x).items():
        np.testing.assert_allclose(scores[name], values, rtol=1e-5, atol=1e-6)
    assert set(scores) == set(detector.score_samples(x))
    np.testing.assert_allclose(heat, expected_heat, rtol=1e-5, atol=1e-5)
    assert set(parts) == set(expected_parts) == ({"image", "residual"} if voxel_model == "normative" else set())
    for name in parts:
        np.testing.assert_allclose(parts[name], expected_parts[name], rtol=1e-5, atol=1e-5)
    if voxel_model != "norm":
        calls = []
        voxel_map = detector._voxel_map
        monkeypatch.setattr(detector, "_voxel_map", lambda *a, **k: calls.append(len(a[0])) or voxel_map(*a, **k))
        detector.score_and_maps(x)
        assert calls == [2, 1]          # one map per chunk of training.feature_batch_size, for both uses
    empty_scores, empty_heat, _ = detector.score_and_maps(x[:0])
    assert empty_heat.shape == (0, 16, 16, 16) and all(len(v) == 0 for v in empty_scores.values())


@pytest.fixture(scope="module")
def lesion_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesion_cohort")
    return write_synthetic_cohort(root, n_inliers=8, ages=(1,), per_age=2, seed=4, resolution_mm=4.0,
                                  n_lesion=2, lesion_polarity="hyper")


def test_cli_3d_train_score_maps_and_lesion_evaluation(tmp_path, lesion_cohort):
    run = tmp_path / "run3d"
    result = invoke("train", "--config", "msma3d_quick", "--data-dir", lesion_cohort, "--out", run, *set_args(TINY_3D))
    assert result.exit_code == 0, result.output
    assert json.loads((run / "model.json").read_text())["spatial_dims"] == 3
    lesion_scan = sorted(lesion_cohort.glob("sub-*/anat/*_T1w.nii.gz"))[-1]   # the last subjects have lesions
    result = invoke("score", lesion_scan, "--run", run, "--maps", tmp_path / "maps", "--json")
    assert result.exit_code == 0, result.output
    stem = lesion_scan.name.removesuffix(".nii.gz")
    on_scan = nib.load(str(tmp_path / "maps" / f"{stem}_anomaly_map.nii.gz"))
    source = nib.load(str(lesion_scan))
    assert on_scan.shape == source.shape
    np.testing.assert_allclose(on_scan.affine, source.affine, atol=1e-5)
    assert nib.load(str(tmp_path / "maps" / f"{stem}_anomaly_map_model.nii.gz")).shape == (40, 48, 40)
    assert (tmp_path / "maps" / f"{stem}_anomaly_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = invoke("evaluate", "--run", run, "--data-dir", lesion_cohort, "--group-by", "lesion")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["group_by"] == "lesion" and list(metrics["groups"]) == ["lesion"]
    located = metrics["localisation"]["msma"]
    for name in ("map", "intensity_bright", "intensity_dark"):
        assert located[name]["n_scans"] == 2
        assert 0 <= located[name]["pooled"]["auroc"] <= 1
    # Hyperintense lesions: the image itself finds them far better than chance.
    assert located["intensity_bright"]["pooled"]["auroc"] > 0.8
    assert "Lesion localisation" in result.output

    result = invoke("evaluate", "--run", run, "--data-dir", lesion_cohort)
    assert result.exit_code == 0, result.output
    assert set(json.loads((run / "metrics.json").read_text())["groups"]) == {"1", "lesion"}
