import numpy as np
import pytest
from nflows.transforms.autoregressive import MaskedAffineAutoregressiveTransform
from nflows.transforms.permutations import ReversePermutation
from sklearn.base import clone
from torch import nn

from neuro_ood.errors import NeuroOODError, RunError
from neuro_ood.metrics import ood_metrics
from neuro_ood.scorers import (SCORERS, AuxiliaryScorer, GMMScorer, KNNScorer, MAFScorer,
                               build_scorer, load_scorers, save_scorers)

FAST = {"gmm": {"n_components": (1, 2, 4), "cv": 3},
        "maf": {"epochs": 50},
        "knn": {}}
NAMES = sorted(SCORERS)


def blob(dim, n_fit=300, n_eval=100, seed=0):
    rng = np.random.default_rng(seed)
    cov = np.diag(np.linspace(0.5, 2.0, dim))
    fit, held = (rng.multivariate_normal(np.ones(dim), cov, size=n) for n in (n_fit, n_eval))
    far = rng.multivariate_normal(np.ones(dim) + 8.0, cov, size=n_eval)
    return fit, held, far


@pytest.fixture(scope="module", params=[2, 10], ids=["2d", "10d"])
def fitted(request):
    fit, held, far = blob(request.param)
    scorers = {name: build_scorer(name, **FAST[name]).fit(fit) for name in NAMES}
    return scorers, held, far


def test_registry():
    assert SCORERS == {"gmm": GMMScorer, "maf": MAFScorer, "knn": KNNScorer}
    assert isinstance(build_scorer("knn", n_neighbors=3), AuxiliaryScorer)
    with pytest.raises(NeuroOODError, match="gmm, knn, maf"):
        build_scorer("svm")
    # The old names are gone: "flow" was easily read as Glow, "kdtree" named the index.
    for old in ("flow", "kdtree"):
        with pytest.raises(NeuroOODError, match="valid names"):
            build_scorer(old)


@pytest.mark.parametrize("name", NAMES)
def test_ranks_blob_above_far_points(fitted, name):
    scorers, held, far = fitted
    s_in, s_out = scorers[name].score_samples(held), scorers[name].score_samples(far)
    assert s_in.shape == (len(held),) and s_out.shape == (len(far),)
    assert s_in.dtype == np.float64 and np.all(np.isfinite(s_in))
    assert ood_metrics(s_in, s_out)["auroc"] > 0.95


@pytest.mark.parametrize("name", NAMES)
def test_clone(fitted, name):
    scorer = fitted[0][name]
    copy = clone(scorer)
    assert type(copy) is type(scorer)
    assert copy.get_params() == scorer.get_params()
    assert not [k for k in vars(copy) if k.endswith("_")]


def test_save_load_round_trip(fitted, tmp_path):
    scorers, held, far = fitted
    save_scorers(tmp_path, scorers)
    assert (tmp_path / "scorers.safetensors").is_file() and (tmp_path / "scorers.json").is_file()
    loaded = load_scorers(tmp_path)
    assert set(loaded) == set(scorers)
    X = np.vstack([held, far])
    for name, scorer in scorers.items():
        assert type(loaded[name]) is type(scorer)
        assert loaded[name].get_params() == scorer.get_params()
        np.testing.assert_allclose(loaded[name].score_samples(X), scorer.score_samples(X),
                                   rtol=1e-6)


def test_load_missing_files(tmp_path):
    with pytest.raises(RunError, match="scorers.safetensors"):
        load_scorers(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_feature_count(fitted, name):
    scorer = fitted[0][name]
    with pytest.raises(ValueError, match="features"):
        scorer.score_samples(np.zeros((3, scorer.n_features_in_ + 1)))


def test_gmm_picks_more_than_two_components_on_four_clusters():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    X = np.vstack([c + rng.normal(scale=0.5, size=(60, 2)) for c in centres])
    gmm = GMMScorer(n_components=(1, 2, 4, 6), cv=5, n_jobs=1).fit(X)
    assert gmm.n_components_ > 2
    assert gmm.cv_results_["n_components"] == [1, 2, 4, 6]
    assert len(gmm.cv_results_["mean_test_score"]) == 4
    _, meta = gmm.get_state()
    assert meta["n_components_"] == gmm.n_components_ and "cv_results_" in meta


@pytest.mark.parametrize("n, grid, allowed", [(6, None, [2, 4]), (3, None, [2]), (4, (5, 8), [3])])
def test_gmm_clips_candidates_on_tiny_data(n, grid, allowed):
    # n=6: cv=min(10, 6)=6 folds, smallest training fold 5 -> candidates 2, 4.
    # n=3: 3 folds, training folds of 2 -> candidate 2.
    # n=4, grid (5, 8): training folds of 3, nothing fits -> falls back to 3.
    X = np.random.default_rng(2).normal(size=(n, 3))
    gmm = GMMScorer(**({} if grid is None else {"n_components": grid})).fit(X)
    assert gmm.cv_results_["n_components"] == allowed
    assert gmm.n_components_ in allowed
    assert np.all(np.isfinite(gmm.score_samples(X)))


def test_gmm_too_few_samples():
    with pytest.raises(ValueError, match="at least 3 samples"):
        GMMScorer().fit(np.zeros((2, 3)))


def test_knn_is_minus_kth_neighbour_distance():
    # 1-D training set 0..5: mean 2.5, std sqrt(17.5 / 6). From the query 2.5 the raw distances
    # are .5, .5, 1.5, 1.5, 2.5, 2.5, so the 5th nearest is 2.5 (standardised: 2.5 / std).
    X = np.arange(6, dtype=float)[:, None]
    knn = KNNScorer(n_neighbors=5).fit(X)
    assert knn.score_samples([[2.5]])[0] == pytest.approx(-2.5 / np.sqrt(17.5 / 6))
    # Brute force on random 3-D data.
    rng = np.random.default_rng(3)
    X, Q = rng.normal(size=(40, 3)), rng.normal(size=(7, 3))
    mu, sd = X.mean(0), X.std(0)
    d = np.linalg.norm((Q - mu)[:, None] / sd - ((X - mu) / sd)[None], axis=2)
    np.testing.assert_allclose(KNNScorer().fit(X).score_samples(Q), -np.sort(d, axis=1)[:, 4])


def test_knn_too_few_samples():
    with pytest.raises(ValueError, match="n_neighbors"):
        KNNScorer(n_neighbors=5).fit(np.zeros((4, 2)))


def test_made_has_two_hidden_layers_of_128(fitted):
    flow = fitted[0]["maf"].flow_
    L = fitted[0]["maf"].n_features_in_
    transforms = list(flow._transform._transforms)
    assert [type(t) for t in transforms] == [MaskedAffineAutoregressiveTransform,
                                             ReversePermutation] * 5
    for made in (t.autoregressive_net for t in transforms[::2]):
        linears = [m for m in made.modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(L, 128), (128, 128),
                                                                      (128, 2 * L)]
        assert not made.use_residual_blocks


def test_maf_is_deterministic():
    X = blob(4, n_fit=64)[0]
    a = MAFScorer(epochs=3, hidden_features=16).fit(X).score_samples(X)
    b = MAFScorer(epochs=3, hidden_features=16).fit(X).score_samples(X)
    np.testing.assert_array_equal(a, b)


def slices_of_scans(n_groups=40, per_group=3, seed=0):
    """Per-slice vectors: each scan (group) gives ``per_group`` near-identical rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_groups, 2))
    X = np.repeat(centres, per_group, axis=0) + rng.normal(scale=1e-3, size=(per_group * n_groups, 2))
    return X, np.repeat(np.arange(n_groups), per_group)


def leaks(splitter, X, groups):
    """Number of folds whose test rows share a group with their training rows."""
    grouped = {"groups": groups} if "Group" in type(splitter).__name__ else {}
    return sum(bool(set(groups[train]) & set(groups[test]))
               for train, test in splitter.split(X, **grouped))


def test_gmm_cv_with_groups_never_splits_a_subject():
    X, groups = slices_of_scans()
    grid = (1, 2, 4, 8, 16, 32)
    grouped = GMMScorer(n_components=grid, cv=5, n_jobs=1).fit(X, groups=groups)
    assert grouped.cv_results_["splitter"] == "GroupKFold" and grouped.cv_results_["n_splits"] == 5
    folds = list(grouped.cv_splitter_.split(X, groups=groups))
    assert len(folds) == 5 and leaks(grouped.cv_splitter_, X, groups) == 0
    assert sorted(np.concatenate([test for _, test in folds]).tolist()) == list(range(len(X)))
    # Without groups a scan's near-duplicate slices sit on both sides of the split, which rewards
    # one tiny component per scan; held-out scans reveal that as overfitting.
    plain = GMMScorer(n_components=grid, cv=5, n_jobs=1).fit(X)
    assert plain.cv_results_["splitter"] == "KFold" and leaks(plain.cv_splitter_, X, groups) == 5
    assert plain.n_components_ >= 16
    assert grouped.n_components_ <= 2
    # The grouped fit is recorded with the scorer and survives a save / load.
    _, meta = grouped.get_state()
    assert meta["cv_results_"]["splitter"] == "GroupKFold"


def test_gmm_group_folds_cap_splits_and_candidates():
    # 4 groups (one of 6 rows, three of 1): cv=10 -> 4 folds; the fold testing the big group
    # trains on 3 rows, so candidates above 3 are dropped (row-count KFold logic would allow 6).
    X = np.random.default_rng(4).normal(size=(9, 2))
    groups = np.array(["a"] * 6 + ["b", "c", "d"])
    gmm = GMMScorer(n_components=(2, 3, 4, 6), cv=10, n_jobs=1).fit(X, groups=groups)
    assert gmm.cv_results_["n_splits"] == 4
    assert gmm.cv_results_["n_components"] == [2, 3]
    assert np.all(np.isfinite(gmm.score_samples(X)))


def test_gmm_groups_are_checked():
    X = np.random.default_rng(5).normal(size=(6, 2))
    with pytest.raises(ValueError, match="shape"):
        GMMScorer().fit(X, groups=np.arange(5))
    with pytest.raises(ValueError, match="2 distinct groups"):
        GMMScorer().fit(X, groups=np.zeros(6))
    with pytest.raises(ValueError, match="training folds of >= 2"):
        GMMScorer(cv=2).fit(X, groups=[0, 0, 0, 0, 0, 1])


@pytest.mark.parametrize("cls, params", [(KNNScorer, {"n_neighbors": 3}),
                                         (MAFScorer, {"epochs": 2, "hidden_features": 8})])
def test_every_scorer_accepts_groups(cls, params):
    X, groups = slices_of_scans(n_groups=10)
    with_groups = cls(**params).fit(X, groups=groups).score_samples(X)
    np.testing.assert_array_equal(with_groups, cls(**params).fit(X).score_samples(X))
