"""Every detector behind one contract: fit / score_samples / maps / save / load, 2-D and 3-D."""

import json

import numpy as np
import pytest
import torch

from neuro_ood.config import METHODS, config_from_dict
from neuro_ood.detectors import DETECTORS, build_detector, load_detector
from neuro_ood.errors import RunError

TINY = {
    "msma": {"model": {"channels": [8, 16], "strides": [2]},
             "scorers": {"gmm": {"n_components": [1, 2], "cv": 3, "n_jobs": 1}, "knn": {"n_neighbors": 3}}},
    "glow": {"model": {"n_scales": 2, "steps_per_scale": 2, "hidden": 8}, "training": {"lr": 1e-3}},
    "fanogan": {"fanogan": {"width": 4, "latent_dim": 8, "n_critic": 2, "encoder_steps": 4}},
    "resnet": {"resnet": {"depth": 10, "widen": 0.125, "head_hidden": 8}},
    "simple": {"scorers": {"gmm": {"n_components": [1, 2], "cv": 3, "n_jobs": 1}, "knn": {"n_neighbors": 3}}},
}


def tiny_cfg(method, steps=6, **training):
    values = {"method": method, **TINY[method]}
    values["training"] = {"steps": steps, "batch_size": 8, "checkpoint_every": 3, "device": "cpu",
                          **values.get("training", {}), **training}
    return config_from_dict(values)


def blobs(n, seed, radius=5.0, shape=(16, 16)):
    """``(n, 1, *shape)`` bright discs of random position (inliers: radius 5) in [0, 1]."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    out = np.empty((n, 1, *shape), np.float32)
    for i in range(n):
        centre = [rng.uniform(s / 2 - 2, s / 2 + 2) for s in shape]
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre)))
        out[i, 0] = np.clip(1.2 - dist / radius, 0, 1) + rng.normal(0, 0.02, shape)
    return np.clip(out, 0, 1)


def test_every_method_of_the_config_is_a_detector():
    assert set(METHODS) == set(DETECTORS) == set(TINY)


@pytest.mark.parametrize("method", sorted(DETECTORS))
def test_fit_score_save_load_round_trip(method, tmp_path):
    x = blobs(24, 0)
    outliers = blobs(12, 1, radius=2.0) if DETECTORS[method].needs_outliers else None
    stages = []
    detector = build_detector(tiny_cfg(method)).fit(
        x, groups=np.repeat(np.arange(8), 3), outliers=outliers, checkpoint_dir=tmp_path,
        progress=lambda stage, done, total, loss: stages.append((stage, done, total)))
    assert any(done == total for _, done, total in stages)
    first = {}
    for stage, done, _ in stages:
        first.setdefault(stage, done)
    assert all(done == 0 for done in first.values()), first   # each bar starts (and its clock) at 0
    detector.save(tmp_path)
    test = blobs(5, 2)
    scores = detector.score_samples(test)
    assert scores and all(v.shape == (5,) and v.dtype == np.float64 for v in scores.values())
    loaded = load_detector(tmp_path, "cpu")
    assert type(loaded) is type(detector) and loaded.train_state is None
    # a detector without a network stores no weights and no training state
    assert {(tmp_path / f).is_file() for f in ("model.safetensors", "train_state.pt")} == {detector.has_network}
    again = loaded.score_samples(test)
    for name in scores:
        np.testing.assert_allclose(again[name], scores[name], rtol=1e-5, atol=1e-6)
    if detector.localises:
        assert loaded.maps(test).shape == (5, 16, 16)
    else:
        with pytest.raises(NotImplementedError):
            loaded.maps(test)


@pytest.mark.parametrize("method", sorted(DETECTORS))
def test_training_resumes_from_the_checkpoint_in_either_stage(method, tmp_path):
    if not DETECTORS[method].has_network:
        pytest.skip(f"{method} has no network and no training loop to resume")
    x = blobs(16, 0)
    outliers = blobs(8, 1, radius=2.0) if DETECTORS[method].needs_outliers else None
    first = build_detector(tiny_cfg(method, steps=3)).fit(x, outliers=outliers, checkpoint_dir=tmp_path)
    done = first.train_state.step
    steps = []
    resumed = build_detector(tiny_cfg(method, steps=6)).fit(
        x, outliers=outliers, checkpoint_dir=tmp_path, progress=lambda stage, d, t, loss: steps.append(d))
    assert resumed.train_state.step == done + 3
    assert json.loads((tmp_path / "model.json").read_text())["step"] == resumed.train_state.step


def test_msma_takes_volumes_and_keeps_its_noise_levels_in_the_checkpoint(tmp_path):
    volumes = blobs(12, 0, shape=(8, 12, 8))
    detector = build_detector(tiny_cfg("msma", steps=2)).fit(volumes, checkpoint_dir=tmp_path)
    detector.save(tmp_path)
    assert detector.score_samples(volumes[:2])["gmm"].shape == (2,)
    assert detector.maps(volumes[:2]).shape == (2, 8, 12, 8)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["spatial_dims"] == 3
    meta["model"]["sigma_min"] = 0.5          # the levels come from the weights, not the config
    (tmp_path / "model.json").write_text(json.dumps(meta))
    loaded = load_detector(tmp_path)
    torch.testing.assert_close(loaded.sigmas, detector.sigmas)
    assert loaded.sigmas.min().item() == pytest.approx(0.01)


def test_ema_weights_are_scored_with_and_resumed(tmp_path):
    x = blobs(16, 0)
    detector = build_detector(tiny_cfg("msma", steps=4, ema_decay=0.5)).fit(x, checkpoint_dir=tmp_path)
    detector.save(tmp_path)
    raw = {k: v.clone() for k, v in detector.network.state_dict().items()}
    ema = detector.scoring_network.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    saved = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert saved["ema"] is not None and set(saved["raw_weights"]) == set(raw)
    loaded = load_detector(tmp_path)
    for key, value in loaded.network.state_dict().items():
        torch.testing.assert_close(value, ema[key].cpu())
    resumed = build_detector(tiny_cfg("msma", steps=6, ema_decay=0.5)).fit(x, checkpoint_dir=tmp_path)
    assert resumed.train_state.step == 6


def test_loading_the_wrong_kind_of_directory_is_one_error(tmp_path):
    with pytest.raises(RunError, match="model.json"):
        load_detector(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(RunError, match="damaged"):
        load_detector(tmp_path)


def test_simple_detector_takes_volumes_and_scores_the_size_cue(tmp_path):
    volumes = blobs(12, 0, shape=(8, 12, 8))
    detector = build_detector(tiny_cfg("simple")).fit(volumes, groups=np.repeat(np.arange(4), 3))
    detector.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "scorers.json", "scorers.safetensors"]
    assert json.loads((tmp_path / "model.json").read_text())["spatial_dims"] == 3
    assert detector.feature_names[-4:] == ("size", "extent_0", "extent_1", "extent_2")
    loaded = load_detector(tmp_path)
    small = blobs(4, 5, radius=2.5, shape=(8, 12, 8))      # the same discs, smaller: atypical
    for name in ("gmm", "knn"):
        assert loaded.score_samples(small)[name].max() < loaded.score_samples(volumes)[name].min(), name
    with pytest.raises(ValueError, match="fitted on inputs"):
        loaded.score_samples(blobs(2, 0))                   # 2-D slices into a 3-D detector


def test_msma_band_features_score_beside_the_papers_norms(tmp_path):
    from neuro_ood.features import score_norms
    from neuro_ood.scorers import KNNScorer

    cfg = config_from_dict({**TINY["msma"], "method": "msma", "msma": {"features": ["band_means", "band_rms"], "bands": 3},
                            "training": {"steps": 4, "batch_size": 8, "checkpoint_every": 4, "device": "cpu"}})
    x, test = blobs(24, 0), blobs(6, 2)
    detector = build_detector(cfg).fit(x, groups=np.repeat(np.arange(8), 3))
    assert detector.features(test).shape == (6, 2 * 10 * 3 + 10)   # bands, then the paper's norms
    scores = detector.score_samples(test)
    assert set(scores) == {"gmm", "knn", "paper_gmm", "paper_knn"}
    # paper_* are the scorers on the L norms alone, as a features: [norms] run would fit them
    norms = score_norms(detector.scoring_network, x, detector.sigmas)
    expected = KNNScorer(3).fit(norms).score_samples(score_norms(detector.scoring_network, test, detector.sigmas))
    np.testing.assert_allclose(scores["paper_knn"], expected, rtol=1e-6)
    assert not np.allclose(scores["knn"], scores["paper_knn"])
    detector.save(tmp_path)
    again = load_detector(tmp_path, "cpu").score_samples(test)
    for name in scores:
        np.testing.assert_allclose(again[name], scores[name], rtol=1e-5, atol=1e-6)
