"""Baselines through the CLI and one side-by-side evaluation with MSMA, on the tiny cohort."""

import json
import shutil

import pytest

from tests.conftest import TINY_OVERRIDES, invoke, set_args

TINY_T1 = [o for o in TINY_OVERRIDES if o.startswith("preprocessing.")]
TINY_FANOGAN = [*TINY_T1, "fanogan.width=4", "fanogan.latent_dim=8", "fanogan.encoder_steps=3",
                "training.steps=3", "training.batch_size=8", "training.checkpoint_every=2"]
# 20 steps: fewer leave the batch-norm statistics near their initial values and the ranking arbitrary
TINY_RESNET = [*TINY_T1, "resnet.depth=10", "resnet.widen=0.125", "resnet.head_hidden=8",
               "training.steps=20", "training.batch_size=8", "training.checkpoint_every=10"]
TINY_SIMPLE = [*TINY_T1, "scorers.gmm={n_components: [1, 2], cv: 3, n_jobs: 1}", "scorers.knn={n_neighbors: 3}"]


@pytest.fixture(scope="module")
def runs(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    commands = {
        "msma": ["train", "--config", "msma_quick", *set_args(TINY_OVERRIDES)],
        "fanogan": ["baseline", "fanogan", "--config", "fanogan_quick", *set_args(TINY_FANOGAN)],
        "resnet": ["baseline", "resnet", "--outlier-group", "1", "--config", "resnet_quick", *set_args(TINY_RESNET)],
        "simple": ["baseline", "simple", "--config", "simple_quick", *set_args(TINY_SIMPLE)],
    }
    for name, command in commands.items():
        result = invoke(*command, "--dataset", "abcd", "--data-dir", tiny_cohort, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


def test_resnet_run_records_the_group_it_saw(runs, tiny_cohort):
    split = json.loads((runs / "resnet" / "split.json").read_text())
    msma_split = json.loads((runs / "msma" / "split.json").read_text())
    assert split["heldout"] == msma_split["heldout"]
    seen = set(split["train"]) - set(msma_split["train"])
    ages = dict(line.split("\t")[:2] for line in (tiny_cohort / "participants.tsv").read_text().splitlines()[1:])
    assert seen and all(round(float(ages[s])) == 1 for s in seen)
    assert "outlier_group: '1'" in (runs / "resnet" / "config.yaml").read_text()


def test_rerunning_the_resnet_keeps_the_outlier_subjects_it_saw(runs, tiny_cohort):
    before = json.loads((runs / "resnet" / "split.json").read_text())
    result = invoke("baseline", "resnet", "--outlier-group", "1", "--config", "resnet_quick", *set_args(TINY_RESNET),
                    "--dataset", "abcd", "--data-dir", tiny_cohort, "--out", runs / "resnet")
    assert result.exit_code == 0, result.output
    assert json.loads((runs / "resnet" / "split.json").read_text()) == before


def test_scoring_nothing_usable_with_a_resnet_run_is_one_line(runs, tmp_path):
    (tmp_path / "bad.nii.gz").write_text("not an image")
    result = invoke("score", tmp_path / "bad.nii.gz", "--run", runs / "resnet")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "bad.nii.gz" in errors[0]
    assert "Traceback" not in result.output


def test_side_by_side_evaluation(runs, tiny_cohort):
    result = invoke("evaluate", "--run", runs / "msma", "--run", runs / "fanogan", "--run", runs / "resnet",
                    "--run", runs / "simple", "--data-dir", tiny_cohort, "--group-by", "age")
    assert result.exit_code == 0, result.output
    metrics = json.loads((runs / "msma" / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"msma", "fanogan", "resnet", "simple"}
    groups = {label: run["groups"] for label, run in metrics["runs"].items()}
    assert groups["msma"].keys() == groups["fanogan"].keys() == groups["resnet"].keys() == {"1", "6"}
    assert groups["simple"].keys() == {"1", "6"} and groups["simple"]["1"]["n"] == groups["msma"]["1"]["n"]
    assert set(groups["simple"]["6"]["scorers"]) == {"gmm", "knn"} and "simple" in result.stdout
    # the 1-year-olds the classifier trained on are left out for every method alike
    assert groups["msma"]["1"]["n"] == groups["resnet"]["1"]["n"] < 4
    assert set(groups["resnet"]["1"]["scorers"]) == {"resnet"} and set(groups["fanogan"]["6"]["scorers"]) == {"fanogan"}
    assert metrics["runs"]["resnet"]["seen_groups"] == ["1"] and metrics["runs"]["msma"]["seen_groups"] == []
    assert "*" in result.stdout and "fanogan" in result.stdout and "gmm" in result.stdout
    # direction: every method ranks the 1-year-olds clearly below the held-out inliers (a dropped
    # minus sign anywhere between network and table would put this near 0)
    for label, score in (("msma", "gmm"), ("msma", "maf"), ("fanogan", "fanogan"), ("resnet", "resnet"),
                         ("simple", "gmm"), ("simple", "knn")):
        assert groups[label]["1"]["scorers"][score]["auroc"] > 0.9, (label, score)


def test_mismatched_heldout_sets_are_refused_unless_intersected(runs, tiny_cohort, tmp_path):
    other = tmp_path / "other"
    result = invoke("train", "--config", "msma_quick", *set_args(TINY_OVERRIDES), "--set", "data.split_seed=4",
                    "--data-dir", tiny_cohort, "--out", other)
    assert result.exit_code == 0, result.output
    shared = (set(json.loads((runs / "msma" / "split.json").read_text())["heldout"])
              & set(json.loads((other / "split.json").read_text())["heldout"]))
    assert len(shared) == 2  # seeds 0 and 4 hold out 3 subjects each, 2 of them the same
    result = invoke("evaluate", "--run", runs / "msma", "--run", other, "--data-dir", tiny_cohort)
    assert result.exit_code == 2 and "hold out different subjects" in result.stderr
    result = invoke("evaluate", "--run", runs / "msma", "--run", other, "--data-dir", tiny_cohort, "--intersection")
    assert result.exit_code == 0, result.output
    metrics = json.loads((runs / "msma" / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"msma", "msma#2"}
    assert metrics["runs"]["msma"]["inliers"]["n"] == metrics["runs"]["msma#2"]["inliers"]["n"] == len(shared)
    assert metrics["runs"]["msma"]["groups"].keys() == metrics["runs"]["msma#2"]["groups"].keys()


def test_fanogan_score_and_swapped_preprocessing(runs, tiny_cohort, tmp_path):
    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", scan, "--run", runs / "fanogan", "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["scans"][0]
    assert set(entry["scores"]) == {"fanogan"} and entry["primary"] == "fanogan"
    result = invoke("score", scan, "--run", runs / "resnet", "--json")
    assert set(json.loads(result.stdout)["scans"][0]["scores"]) == {"resnet"}
    result = invoke("score", scan, "--run", runs / "fanogan", "--maps", tmp_path / "maps")
    assert result.exit_code == 0 and (tmp_path / "maps" / "sub-0001_T1w_anomaly_map.png").is_file()
    result = invoke("score", scan, "--run", runs / "resnet", "--maps", tmp_path / "maps")
    assert result.exit_code == 2 and "no voxel-level maps" in result.stderr
    copy = tmp_path / "fanogan"
    shutil.copytree(runs / "fanogan", copy)
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace("slice_fit: pad", "slice_fit: resize"))
    result = invoke("score", scan, "--run", copy)
    assert result.exit_code == 2 and "other preprocessing" in result.stderr


def test_simple_baseline_runs_like_any_method(runs, tiny_cohort):
    simple = runs / "simple"
    assert json.loads((simple / "split.json").read_text()) == json.loads((runs / "msma" / "split.json").read_text())
    assert not (simple / "model.safetensors").exists() and not (simple / "train_state.pt").exists()
    assert json.loads((simple / "preprocessing.json").read_text()) == json.loads(
        (runs / "msma" / "preprocessing.json").read_text())
    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", scan, "--run", simple, "--json")
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)["scans"][0]
    assert set(entry["scores"]) == {"gmm", "knn"} and entry["primary"] == "gmm"
    result = invoke("train", "--model", "simple", "--config", "simple_quick", *set_args(TINY_SIMPLE),
                    "--data-dir", tiny_cohort, "--out", simple)       # the same path through `train`
    assert result.exit_code == 0 and "no network" in result.stdout, result.output
