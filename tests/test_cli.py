"""The CLI end to end on a tiny synthetic cohort, and every kind of bad input."""

import json

import numpy as np

import pytest

from tests.conftest import TINY_OVERRIDES, invoke, set_args
from tests.test_nifti import write_bad_files


@pytest.fixture(scope="module")
def trained_run(tiny_cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    result = invoke("train", "--dataset", "abcd", "--data-dir", tiny_cohort, "--config", "msma_quick",
                    *set_args(TINY_OVERRIDES), "--out", run)
    assert result.exit_code == 0, result.output
    return run


def test_train_writes_a_complete_run(trained_run):
    for name in ("config.yaml", "preprocessing.json", "split.json", "model.safetensors", "model.json",
                 "train_state.pt", "scorers.safetensors", "scorers.json", "reference.json"):
        assert (trained_run / name).is_file(), name
    split = json.loads((trained_run / "split.json").read_text())
    assert not set(split["train"]) & set(split["heldout"])
    reference = json.loads((trained_run / "reference.json").read_text())
    # msma_quick's band features, and the paper's L norms scored beside them
    assert set(reference["scorers"]) == {"gmm", "maf", "knn", "paper_gmm", "paper_maf", "paper_knn"}
    assert len(reference["scorers"]["gmm"]["scores"]) == len(split["heldout"]) == len(reference["items"])


def test_evaluate_by_age_writes_metrics_json(trained_run, tiny_cohort):
    result = invoke("evaluate", "--run", trained_run, "--data-dir", tiny_cohort, "--group-by", "age")
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert set(metrics["groups"]) == {"1", "6"}
    for group in metrics["groups"].values():
        assert group["n"] == 4
        assert set(group["scorers"]) == {"gmm", "maf", "knn", "paper_gmm", "paper_maf", "paper_knn"}
        # per-slice rows beside the per-scan ones: 3 slices per scan
        assert group["n_slices"] == 12 and set(group["slice_scorers"]) == set(group["scorers"])
        for values in [*group["scorers"].values(), *group["slice_scorers"].values()]:
            for key in ("auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "detection_error"):
                assert 0.0 <= values[key] <= 1.0
    assert "per slice" in result.output or "slice" in result.output
    # direction: 1-year-olds score clearly below the held-out inliers with every scorer
    assert all(values["auroc"] > 0.9 for values in metrics["groups"]["1"]["scorers"].values())


def test_evaluate_by_lesion_on_a_cohort_without_lesions_says_so(trained_run, tiny_cohort):
    result = invoke("evaluate", "--run", trained_run, "--data-dir", tiny_cohort, "--group-by", "lesion")
    assert result.exit_code != 0
    assert "has a lesion" in result.output and "Traceback" not in result.output


def test_trained_score_network_depends_on_sigma(trained_run, tiny_cohort):
    """σ·s_θ(x̃, σ) at σ_max and σ_min on one noisy input differ: the network uses its σ input
    (a network blind to σ would give the same σ·s at every level, and flat score-norm vectors)."""
    import torch

    from neuro_ood.detectors import load_detector
    from neuro_ood.pipelines.common import prepare_items
    from neuro_ood.pipelines.datasets import dataset_adapter
    from neuro_ood.pipelines.rundir import RunDir

    detector = load_detector(trained_run)
    adapter = dataset_adapter(RunDir(trained_run).load_config())
    items = prepare_items(adapter, adapter.sources(tiny_cohort)[:2]).items
    x = torch.from_numpy(np.concatenate([item.slices for item in items]))
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    sigmas = detector.sigmas
    with torch.no_grad():
        high = detector.network(noisy, sigmas[:1].expand(len(x))) * sigmas[0]
        low = detector.network(noisy, sigmas[-1:].expand(len(x))) * sigmas[-1]
    assert ((high - low).norm() / high.norm()).item() > 0.1


def test_score_json_gives_scores_percentiles_and_flags(trained_run, tiny_cohort):
    scans = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[:2]
    result = invoke("score", *scans, "--run", trained_run, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["scans"]) == 2 and payload["failed"] == []
    for entry in payload["scans"]:
        assert set(entry["scores"]) == {"gmm", "maf", "knn", "paper_gmm", "paper_maf", "paper_knn"}
        assert all(0 <= p <= 100 for p in entry["percentiles"].values())
        assert isinstance(entry["flagged"], bool)


def test_score_bad_inputs_one_line_each_and_good_ones_still_scored(trained_run, tiny_cohort, tmp_path):
    cases = write_bad_files(tmp_path)
    good = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", good, *(tmp_path / name for name in cases), "--run", trained_run, "--json")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(cases)
    assert "Traceback" not in result.output
    payload = json.loads(result.stdout)
    assert [entry["path"] for entry in payload["scans"]] == [str(good)]
    assert len(payload["failed"]) == len(cases)


def test_score_streams_scans_in_chunks_with_the_same_results(trained_run, tiny_cohort, tmp_path):
    """Scans stream through preprocessing (worker processes here, a background thread by default)
    and the network a chunk of ``score.batch_slices`` at a time: one scan a chunk gives the scores
    of one chunk for all, in input order, a bad file in between listed as failed."""
    import shutil

    import yaml

    from neuro_ood.pipelines.score import score_scans

    scans = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[:4]
    bad = tmp_path / "bad" / "corrupt.nii.gz"
    bad.parent.mkdir()
    write_bad_files(bad.parent)
    inputs = [*scans[:2], bad, *scans[2:]]
    whole = score_scans(trained_run, inputs, cache_dir=tmp_path / "cache1")
    per_scan_run = tmp_path / "run"
    shutil.copytree(trained_run, per_scan_run)
    config = yaml.safe_load((per_scan_run / "config.yaml").read_text())
    config.setdefault("score", {})["batch_slices"] = 3          # a scan's 3 slices a chunk
    (per_scan_run / "config.yaml").write_text(yaml.safe_dump(config))
    streamed = score_scans(per_scan_run, inputs, cache_dir=tmp_path / "cache2", workers=2)
    assert [r.path for r in streamed.results] == [r.path for r in whole.results] == [str(s) for s in scans]
    assert streamed.failures == whole.failures and [path for path, _ in whole.failures] == [str(bad)]
    for a, b in zip(streamed.results, whole.results):
        assert a.scores.keys() == b.scores.keys()
        np.testing.assert_allclose(list(a.scores.values()), list(b.scores.values()), rtol=1e-5)
        assert a.flags == b.flags


def test_preprocess_stream_gives_the_same_arrays_in_order_in_turn_or_ahead(tiny_cohort, tmp_path):
    """A background thread computes the same arrays as preprocessing in turn, in source order,
    a bad file's reason included; nothing runs meanwhile in turn, so its next is always ready."""
    from neuro_ood.config import load_config
    from neuro_ood.pipelines.common import PreprocessStream
    from neuro_ood.pipelines.datasets import dataset_adapter

    cfg = load_config("msma_quick", TINY_OVERRIDES)
    adapter = dataset_adapter(cfg)
    write_bad_files(tmp_path)
    paths = [*sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[:3], tmp_path / "nan.nii.gz"]
    sources = adapter.sources_from_paths(paths)
    in_turn = PreprocessStream(cfg, adapter, sources, tmp_path / "cache0", workers=0)
    first = list(in_turn)
    assert in_turn.next_is_ready()
    ahead = list(PreprocessStream(cfg, adapter, sources, tmp_path / "cache1", workers=1, ahead=3))
    assert [s.label for s, _, _ in ahead] == [s.label for s, _, _ in first] == [str(p) for p in paths]
    for (_, a, reason_a), (_, b, reason_b) in zip(first, ahead):
        assert reason_a == reason_b
        if a is not None:
            np.testing.assert_array_equal(a["slices"], b["slices"])
    assert first[-1][1] is None and "NaN" in first[-1][2]
    from neuro_ood.pipelines.common import default_workers
    assert default_workers(cfg) == 1 and default_workers(load_config("msma3d_quick")) == 0


def test_score_sources_streams_kept_items_and_drops_their_slices(trained_run, tiny_cohort, tmp_path):
    """``score_sources`` (score and evaluate): the items ``keep`` accepts, scored as
    ``score_items`` scores them all at once, in order, their slices dropped once scored (the count
    kept), each item's maps handed over while its slices are still there."""
    from neuro_ood.pipelines.common import prepare_items, score_items, score_sources
    from neuro_ood.pipelines.datasets import dataset_adapter
    from neuro_ood.pipelines.rundir import RunDir

    run = RunDir(trained_run)
    cfg = run.load_config()
    cfg.score.batch_slices = 4                      # chunks cut across scans
    detector = run.load_detector(cfg)
    adapter = dataset_adapter(cfg)
    sources = adapter.sources(tiny_cohort)[:5]
    wanted = {source.payload.key for source in sources[1::2]}
    seen = []
    scored = score_sources(detector, cfg, adapter, sources, tmp_path / "cache", keep=lambda i: i.key in wanted,
                           on_maps=lambda item, heat, parts: seen.append((item.key, heat.shape, item.slices.shape)))
    full = [i for i in prepare_items(adapter, sources, tmp_path / "cache").items if i.key in wanted]
    expected = score_items(detector, full)
    assert [i.key for i in scored.items] == [i.key for i in full] and len(full) == 2
    assert [i.slices.shape for i in scored.items] == [(len(i.slices), 0) for i in full]
    assert seen == [(i.key, (len(i.slices), *i.slices.shape[2:]), i.slices.shape) for i in full]
    for name, values in expected.items():
        np.testing.assert_allclose(scored.scores[name], values, rtol=1e-5)
    assert len(next(iter(scored.slice_scores.values()))) == sum(len(i.slices) for i in full)


@pytest.mark.parametrize("name", ["truncated.nii.gz", "corrupt.nii.gz", "slice2d.nii.gz", "series4d.nii.gz",
                                  "nan.nii.gz", "constant.nii.gz", "text.nii.gz"])
def test_score_single_bad_file_exits_2_with_one_line(trained_run, tmp_path, name):
    expected = write_bad_files(tmp_path)[name]
    result = invoke("score", tmp_path / name, "--run", trained_run)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line]
    assert lines == [line for line in lines if line.startswith("error:")] and len(lines) == 1
    assert expected in lines[0]


def test_scoring_with_other_preprocessing_is_refused(trained_run, tiny_cohort, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config = (copy / "config.yaml").read_text().replace("n4: false", "n4: true")
    (copy / "config.yaml").write_text(config)
    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", scan, "--run", copy)
    assert result.exit_code == 2
    assert "other preprocessing" in result.stderr and "Traceback" not in result.output


def test_train_resumes_from_its_checkpoint(trained_run, tiny_cohort):
    result = invoke("train", "--data-dir", tiny_cohort, "--config", "msma_quick", *set_args(TINY_OVERRIDES),
                    "--set", "training.steps=14", "--out", trained_run)
    assert result.exit_code == 0, result.output
    assert "resuming from step 12" in result.stderr
    assert json.loads((trained_run / "model.json").read_text())["step"] == 14


def test_resuming_with_another_network_is_refused(trained_run, tiny_cohort):
    result = invoke("train", "--data-dir", tiny_cohort, "--config", "msma_quick", *set_args(TINY_OVERRIDES),
                    "--set", "model.channels=[16, 32]", "--out", trained_run)
    assert result.exit_code == 2 and "other model settings" in result.stderr


def test_user_errors_are_one_line(tmp_path, tiny_cohort):
    result = invoke("train", "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "no sub-" in result.stderr
    result = invoke("train", "--data-dir", tiny_cohort, "--out", tmp_path / "run", "--set", "model.chanels=[1]")
    assert result.exit_code == 2 and "unknown config key" in result.stderr
    result = invoke("score", tiny_cohort / "participants.tsv", "--run", tmp_path / "nothing")
    assert result.exit_code == 2 and "config.yaml" in result.stderr


def test_synth_command_writes_a_bids_cohort(tmp_path):
    result = invoke("synth", tmp_path / "c", "--inliers", "2", "--ages", "1,2", "--per-age", "1",
                    "--seed", "1", "--resolution", "4")
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "c").glob("sub-*/anat/*_T1w.nii.gz"))) == 4
    assert "age" in (tmp_path / "c" / "participants.tsv").read_text()


def test_error_lines_keep_brackets_in_file_names(trained_run, tmp_path):
    bad = tmp_path / "scan[bold]1.nii.gz"
    bad.write_text("not an image")
    result = invoke("score", bad, "--run", trained_run)
    assert result.exit_code == 2 and "scan[bold]1.nii.gz" in result.stderr


def test_score_writes_anomaly_maps(trained_run, tiny_cohort, tmp_path):
    import nibabel as nib

    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", scan, "--run", trained_run, "--maps", tmp_path / "maps", "--json")
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["maps"]
    assert len(files) == 2 and files[0].endswith(".nii.gz") and files[1].endswith(".png")
    nifti = nib.load(tmp_path / "maps" / "sub-0001_T1w_anomaly_map.nii.gz")
    assert nifti.shape == (45, 55, 3) and (nifti.get_fdata() >= 0).all()
    assert (tmp_path / "maps" / "sub-0001_T1w_anomaly_map.png").stat().st_size > 0
    twin = tmp_path / "elsewhere" / scan.name  # the same file name in another folder keeps its own map
    twin.parent.mkdir()
    twin.write_bytes(scan.read_bytes())
    result = invoke("score", scan, twin, "--run", trained_run, "--maps", tmp_path / "maps2", "--json")
    assert len(set(json.loads(result.stdout)["maps"])) == 4


@pytest.mark.parametrize("damage", ["weights", "metadata", "scorers", "reference"])
def test_a_damaged_run_gives_one_error_line(trained_run, tiny_cohort, tmp_path, damage):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    if damage == "weights":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "metadata":
        meta = json.loads((copy / "model.json").read_text())
        del meta["method"]
        (copy / "model.json").write_text(json.dumps(meta))
    elif damage == "scorers":
        (copy / "scorers.json").write_text("{not json")
    else:
        (copy / "reference.json").write_text("")
    scan = sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz"))[0]
    result = invoke("score", scan, "--run", copy)
    assert result.exit_code == 2 and result.stderr.startswith("error:"), result.output
    assert "Traceback" not in result.output


def test_quickstart_pipeline_end_to_end_on_a_tiny_cohort(tmp_path):
    from neuro_ood.pipelines.quickstart import quickstart

    cohort = {"inliers": 8, "ages": (1, 4), "per_age": 2, "seed": 5, "resolution_mm": 4.0}
    metrics = quickstart(tmp_path, overrides=TINY_OVERRIDES, cohort=cohort)
    assert set(metrics["groups"]) == {"1", "4"} and metrics["seconds"] > 0
    assert set(metrics["runs"]) == {"msma", "simple"}  # the simple baseline beside MSMA, on the same groups
    assert metrics["runs"]["simple"]["groups"].keys() == metrics["groups"].keys()
    assert (tmp_path / "cohort" / "participants.tsv").is_file() and (tmp_path / "run" / "metrics.json").is_file()


def test_site_signal_ranks_a_foreign_intensity_profile_below_the_training_scans(trained_run, tiny_cohort, tmp_path):
    """The domain-shift signal: the same brain stored with another scanner's intensity profile
    (gamma-compressed, rescaled to 8 bits, background zeroed) sits outside the training site."""
    import nibabel as nib

    split = json.loads((trained_run / "split.json").read_text())
    scan = next(p for p in sorted(tiny_cohort.glob("sub-*/anat/*.nii.gz")) if p.name.split("_")[0] in split["heldout"])
    image = nib.load(scan)
    data = np.asarray(image.dataobj, dtype=np.float32)
    foreign = np.clip(data, 0, None) ** 0.5
    foreign = np.where(data > 0.1 * np.percentile(data, 99), foreign / foreign.max() * 255, 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(foreign, image.affine), tmp_path / "foreign.nii.gz")
    result = invoke("score", scan, tmp_path / "foreign.nii.gz", "--run", trained_run, "--json")
    assert result.exit_code == 0, result.output
    own, other = (entry["site"] for entry in json.loads(result.stdout)["scans"])
    assert other["site_percentile"] < own["site_percentile"] and other["site_shift"] and not own["site_shift"]
    table = invoke("score", tmp_path / "foreign.nii.gz", "--run", trained_run)
    assert "UNLIKE" in table.stdout
