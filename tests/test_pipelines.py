"""Glow runs on T1 cohorts and MSMA runs on BraTS cases, through the same CLI and run directories."""

import json

import pytest

from tests.conftest import TINY_OVERRIDES, invoke, set_args
from tests.test_brats import write_case


TINY_GLOW = [
    "preprocessing.spacing_mm=[4.0, 4.0, 4.0]", "preprocessing.slice_size=[45, 55]",
    "preprocessing.slice_offsets=[-1, 0, 1]", "model.n_scales=2", "model.steps_per_scale=2", "model.hidden=8",
    "training.steps=6", "training.batch_size=8", "training.warmup_steps=2", "training.checkpoint_every=3",
]
TINY_BRATS = ["preprocessing.slice_size=[44, 48]", "data.heldout_fraction=0.3",
              *[o for o in TINY_OVERRIDES if not o.startswith("preprocessing.")]]


@pytest.fixture(scope="module")
def glow_run(tiny_cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("glow") / "run"
    result = invoke("train", "--dataset", "abcd", "--model", "glow", "--config", "glow_quick",
                    *set_args(TINY_GLOW), "--data-dir", tiny_cohort, "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_glow_run_evaluates_by_age_with_raw_and_last_scale(glow_run, tiny_cohort):
    assert json.loads((glow_run / "model.json").read_text())["method"] == "glow"
    result = invoke("evaluate", "--run", glow_run, "--data-dir", tiny_cohort)
    assert result.exit_code == 0, result.output
    metrics = json.loads((glow_run / "metrics.json").read_text())
    assert metrics["method"] == "glow" and set(metrics["groups"]) == {"1", "6"}
    for group in metrics["groups"].values():
        assert set(group["scorers"]) == {"raw", "last_scale"}
        assert all(0 <= v <= 1 for m in group["scorers"].values() for v in m.values())
    # direction: the 1-year-olds' likelihood lies clearly below the held-out inliers'
    assert metrics["groups"]["1"]["scorers"]["raw"]["auroc"] > 0.9


def test_glow_likelihood_ratio_against_a_general_run(glow_run, tiny_cohort, tmp_path):
    run = tmp_path / "ratio"
    result = invoke("train", "--model", "glow", "--config", "glow_quick", *set_args(TINY_GLOW),
                    "--set", f"model.general_run={glow_run}", "--data-dir", tiny_cohort, "--out", run)
    assert result.exit_code == 0, result.output
    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[-1]
    result = invoke("score", scan, "--run", run, "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["scans"][0]
    assert set(entry["scores"]) == {"raw", "last_scale", "diff"} and entry["primary"] == "last_scale"


def test_model_and_config_must_agree(tiny_cohort, tmp_path):
    result = invoke("train", "--model", "glow", "--config", "msma_quick", "--data-dir", tiny_cohort,
                    "--out", tmp_path / "run")
    assert result.exit_code == 2 and "msma config" in result.stderr


def test_a_run_directory_keeps_its_method(glow_run, tiny_cohort):
    result = invoke("train", "--config", "msma_quick", *set_args(TINY_OVERRIDES), "--data-dir", tiny_cohort,
                    "--out", glow_run)
    assert result.exit_code == 2 and "glow run" in result.stderr


@pytest.fixture(scope="module")
def brats_cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats")
    for index in range(1, 7):
        write_case(root / f"BraTS2021_{index:05d}", case=f"BraTS2021_{index:05d}")
    write_case(root / "BraTS2021_00099", case="BraTS2021_00099", with_seg=False)  # validation-style case
    return root


def test_brats_msma_trains_on_tumour_free_slices_and_evaluates_tumour(brats_cases, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", "--dataset", "brats", "--config", "msma_brats", *set_args(TINY_BRATS),
                    "--data-dir", brats_cases, "--out", run)
    assert result.exit_code == 0, result.output
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["heldout"]) == 7
    reference = json.loads((run / "reference.json").read_text())
    assert all(key.split(":")[0] in split["heldout"] for key in reference["items"])
    # slices of a case without segmentation are never taken as tumour-free inliers
    assert "BraTS2021_00099" in split["heldout"]
    assert not any(key.startswith("BraTS2021_00099") for key in reference["items"])
    result = invoke("evaluate", "--run", run, "--data-dir", brats_cases, "--group-by", "tumour")
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["unit"] == "slice" and set(metrics["groups"]) == {"tumour"}
    assert metrics["groups"]["tumour"]["n"] > 0
    result = invoke("evaluate", "--run", run, "--data-dir", brats_cases, "--group-by", "age")
    assert result.exit_code == 2 and "tumour" in result.stderr
    result = invoke("score", brats_cases / "BraTS2021_00001", brats_cases / "missing", "--run", run, "--json")
    assert result.exit_code == 1
    payload = json.loads(result.stdout)
    assert payload["scans"] and len(payload["failed"]) == 1
