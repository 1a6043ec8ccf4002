"""Template registration, brain masking and white-matter scaling across scanners and sites."""

import dataclasses
import glob
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from neuro_ood.config import PreprocessingConfig, load_config
from neuro_ood.data.synthetic import synthesize_t1
from neuro_ood.errors import ConfigError, ScanError
from neuro_ood.preprocessing.acquisition import ACQUISITION_FEATURES, acquisition_features
from neuro_ood.preprocessing.presets import T1SlicePreprocessor, preprocessing_fingerprint
from neuro_ood.preprocessing.registration import from_sitk, mni152, register_to_template, template_to_scan_grid
from tests.conftest import shared_data

REGISTERED = PreprocessingConfig(spacing_mm=[4.0, 4.0, 4.0], slice_size=[45, 55], slice_offsets=[-1, 0, 1],
                                 registration="mni152", standardise="white_matter")


def _known_transform() -> np.ndarray:
    """Template world -> scan world (RAS mm): rotations of 6° (z) and 4° (x), an anisotropic
    scale of a few per cent and a translation of about a centimetre."""
    a, b = np.deg2rad(6.0), np.deg2rad(4.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    k = np.eye(4)
    k[:3, :3] = rz @ rx @ np.diag([1.06, 0.97, 1.02])
    k[:3, 3] = [5.0, -7.0, 4.0]
    return k


def test_registration_recovers_a_known_affine():
    template = mni152(2)
    known = _known_transform()
    volume = from_sitk(template.image)
    scan = template_to_scan_grid(volume, template, known, volume.shape, template.affine)
    result = register_to_template(scan, template.affine, template)
    points = np.c_[np.argwhere(template.brain())[::50], np.ones(len(np.argwhere(template.brain())[::50]))]
    world = points @ template.affine.T
    error = np.linalg.norm((world @ result.template_to_scan.T - world @ known.T)[:, :3], axis=1)
    assert result.quality > 0.9
    assert error.mean() < 1.5 and error.max() < 4.0   # mm, at 2 mm voxels


def _synthetic(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic 10-year-old's brain-only T1 at 4 mm: ``(X, Y, Z)`` float32 and its affine."""
    image = synthesize_t1(10.0, np.random.default_rng(seed), resolution_mm=4.0)
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def _with_skull(data: np.ndarray, spacing_mm: float) -> np.ndarray:
    """A whole-head version of a brain-only scan: dark CSF/skull, then a bright scalp shell."""
    brain = data > 0.1 * np.percentile(data, 99)
    inner = ndimage.binary_dilation(brain, iterations=max(1, round(4 / spacing_mm)))
    outer = ndimage.binary_dilation(brain, iterations=max(2, round(10 / spacing_mm)))
    head = data.copy()
    head[outer & ~inner] = 0.9 * np.percentile(data[brain], 90)
    return head


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), str(path))
    return path


def test_whole_head_and_skull_stripped_scans_reach_the_network_alike(tmp_path):
    data, affine = _synthetic(4)
    stripped = _write(tmp_path / "stripped.nii.gz", data, affine)
    whole = _write(tmp_path / "whole.nii.gz", _with_skull(data, 4.0), affine)
    plain = dataclasses.replace(REGISTERED, registration="none", standardise="percentile")
    gaps = {}
    for name, cfg in (("registered", REGISTERED), ("plain", plain)):
        pre = T1SlicePreprocessor(cfg)
        a, b = pre(stripped), pre(whole)
        gaps[name] = float(np.abs(a - b).mean())
    assert gaps["registered"] < 0.02
    assert gaps["registered"] < 0.25 * gaps["plain"]


def test_real_whole_head_scan_and_its_stripped_copy_agree(tmp_path):
    folder = shared_data("ixi_t1_2mm")
    path = sorted(glob.glob(str(folder / "*.nii.gz")))[0]
    cfg = dataclasses.replace(REGISTERED, spacing_mm=[2.0, 2.0, 2.0], slice_size=[90, 110], slice_offsets=[-2, 0, 2])
    pre = T1SlicePreprocessor(cfg)
    arrays = pre.arrays(path)
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    template = mni152(2)
    mask = template_to_scan_grid(ndimage.binary_dilation(template.brain(), iterations=1).astype(np.float32),
                                 template, arrays["template_to_scan"], data.shape, image.affine, order=0)
    stripped = _write(tmp_path / "stripped.nii.gz", data * (mask > 0.5), image.affine)
    registered_gap = float(np.abs(pre(stripped) - arrays["slices"]).mean())
    plain = T1SlicePreprocessor(dataclasses.replace(cfg, registration="none", standardise="percentile"))
    plain_gap = float(np.abs(plain(stripped) - plain(path)).mean())
    assert registered_gap < 0.05 and registered_gap < 0.25 * plain_gap   # measured: ~0.02-0.04 vs ~0.17-0.21


def test_a_scan_that_does_not_register_is_one_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    box = np.zeros((40, 40, 40), np.float32)
    box[5:15, 25:38, 2:12] = 1.0 + 0.1 * rng.random((10, 13, 10))   # an off-centre block, not a head
    path = _write(tmp_path / "box.nii.gz", box, np.diag([4.0, 4.0, 4.0, 1.0]))
    with pytest.raises(ScanError) as err:
        T1SlicePreprocessor(REGISTERED)(path)
    message = str(err.value)
    assert "registration to the MNI152 template failed (quality" in message and "\n" not in message


def test_registered_output_carries_the_transform_and_acquisition_features(tmp_path):
    data, affine = _synthetic(1)
    arrays = T1SlicePreprocessor(REGISTERED).arrays(_write(tmp_path / "s.nii.gz", data, affine))
    assert arrays["slices"].shape == (3, 1, 45, 55) and arrays["template_to_scan"].shape == (4, 4)
    features = dict(zip(ACQUISITION_FEATURES, arrays["acquisition"]))
    assert features["registration_quality"] > 0.9 and features["outside_brain_fraction"] < 0.2
    assert features["voxel_mm3"] == pytest.approx(64.0)


def test_acquisition_features_see_skull_stripping_and_the_intensity_scale():
    data, affine = _synthetic(2)
    noisy = data + np.abs(np.random.default_rng(0).normal(0, 20, data.shape)).astype(np.float32)
    stripped = np.where(data > 0.1 * np.percentile(data, 99), noisy, 0.0)
    f_noisy, f_stripped = (dict(zip(ACQUISITION_FEATURES, acquisition_features(v, affine)))
                           for v in (noisy, stripped))
    assert f_stripped["zero_fraction"] > 0.3 > f_noisy["zero_fraction"]
    assert f_stripped["background_noise"] < f_noisy["background_noise"]
    gamma = dict(zip(ACQUISITION_FEATURES, acquisition_features(noisy ** 0.5, affine)))
    assert abs(gamma["head_q25"] - f_noisy["head_q25"]) > 0.1   # another intensity profile


def test_new_options_leave_old_fingerprints_alone_and_are_checked():
    old = PreprocessingConfig()
    assert preprocessing_fingerprint(old) == preprocessing_fingerprint(dataclasses.replace(old, registration="none"))
    assert preprocessing_fingerprint(old) != preprocessing_fingerprint(dataclasses.replace(old, registration="mni152"))
    with pytest.raises(ConfigError, match="white_matter needs preprocessing.registration"):
        load_config("msma_quick", ["preprocessing.standardise=white_matter"])
    with pytest.raises(ConfigError, match="isotropic spacing in whole mm"):
        load_config("msma_quick", ["preprocessing.registration=mni152", "preprocessing.spacing_mm=[1.5, 1.5, 1.5]"])
    with pytest.raises(ConfigError, match="preprocessing.registration must be one of"):
        load_config("msma_quick", ["preprocessing.registration=flirt"])


@pytest.fixture(scope="module")
def registered_run(tiny_cohort, tmp_path_factory):
    from tests.conftest import TINY_OVERRIDES, invoke, set_args

    run = tmp_path_factory.mktemp("registered") / "run"
    result = invoke("train", "--config", "msma_quick", *set_args(TINY_OVERRIDES),
                    "--set", "preprocessing.registration=mni152", "--set", "preprocessing.standardise=white_matter",
                    "--data-dir", tiny_cohort, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_a_registered_run_evaluates_and_refuses_a_non_head_in_one_line(registered_run, tiny_cohort, tmp_path):
    from tests.conftest import invoke

    result = invoke("evaluate", "--run", registered_run, "--data-dir", tiny_cohort)
    assert result.exit_code == 0, result.output
    metrics = json.loads((registered_run / "metrics.json").read_text())
    assert metrics["groups"]["1"]["scorers"]["gmm"]["auroc"] > 0.9
    box = np.zeros((40, 40, 40), np.float32)
    box[5:15, 25:38, 2:12] = 1.0
    _write(tmp_path / "box.nii.gz", box, np.diag([4.0, 4.0, 4.0, 1.0]))
    good = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", good, tmp_path / "box.nii.gz", "--run", registered_run)
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "registration to the MNI152 template failed" in errors[0]
    assert "Traceback" not in result.output
