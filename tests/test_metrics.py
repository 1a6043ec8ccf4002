import numpy as np
import pytest

from neuro_ood.metrics import fpr_at_tpr, ood_metrics

KEYS = {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "detection_error", "fpr_at_80_tpr"}


def test_small_example_by_hand():
    # Ranking (high to low): .9 in, .8 in, .7 in, .65 OUT, .6 in, .5 out, .4 out, .3 out.
    # AUROC = correctly ordered (in, out) pairs / 16: only (0.6, 0.65) is wrong -> 15/16.
    # ROC points: (FPR, TPR) = (0, .75) at t=.7, (.25, .75) at t=.65, (.25, 1) at t=.6.
    # TPR >= .95 or >= .8 first reached at t=.6 -> FPR .25.
    # Detection error: 0.5*(1-.75) + 0.5*0 = 0.125 (= 0.5*0 + 0.5*.25 at t=.6).
    # AUPR-in: precision at each inlier = 1/1, 2/2, 3/3, 4/5 -> mean 0.95.
    # AUPR-out (negated, outliers first): .3, .4, .5 out, .6 in, .65 out -> 1, 1, 1, 4/5 -> 0.95.
    m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.65, 0.5, 0.4, 0.3])
    assert set(m) == KEYS
    assert m["auroc"] == pytest.approx(15 / 16)
    assert m["fpr_at_95_tpr"] == pytest.approx(0.25)
    assert m["fpr_at_80_tpr"] == pytest.approx(0.25)
    assert m["detection_error"] == pytest.approx(0.125)
    assert m["aupr_in"] == pytest.approx(0.95)
    assert m["aupr_out"] == pytest.approx(0.95)


def test_twenty_inliers_by_hand():
    # Inliers 1..20 (TPR steps of 0.05), outliers 1.5, 3.5, 10.5, 25.
    # AUROC: inliers above each outlier: 19 + 17 + 10 + 0 = 46 of 80 pairs -> 0.575.
    # TPR >= .95 needs threshold <= 2 -> outliers >= 2: 3.5, 10.5, 25 -> FPR .75.
    # TPR >= .80 needs threshold <= 5 -> outliers >= 5: 10.5, 25 -> FPR .5.
    # Detection error: at t=4, TPR=17/20, FPR=2/4 -> .5*.15 + .5*.5 = .325; other candidates:
    # t=11 (.5, .25) -> .375, t=2 (.95, .75) -> .4, t=inf -> .5; minimum .325.
    s_in, s_out = np.arange(1, 21, dtype=float), [1.5, 3.5, 10.5, 25.0]
    m = ood_metrics(s_in, s_out)
    assert m["auroc"] == pytest.approx(0.575)
    assert m["fpr_at_95_tpr"] == pytest.approx(0.75)
    assert m["fpr_at_80_tpr"] == pytest.approx(0.5)
    assert m["detection_error"] == pytest.approx(0.325)
    assert fpr_at_tpr(s_in, s_out, 0.95) == pytest.approx(0.75)
    assert fpr_at_tpr(s_in, s_out, 0.80) == pytest.approx(0.5)
    assert fpr_at_tpr(s_in, s_out, 1.0) == pytest.approx(1.0)


def test_perfect_separation():
    m = ood_metrics([5.0, 6.0, 7.0], [1.0, 2.0])
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr_at_95_tpr": 0.0,
                 "detection_error": 0.0, "fpr_at_80_tpr": 0.0}


def test_reversed_separation():
    m = ood_metrics([1.0, 2.0], [5.0, 6.0, 7.0])
    assert m["auroc"] == 0.0
    assert m["fpr_at_95_tpr"] == 1.0
    assert m["detection_error"] == pytest.approx(0.5)


def test_all_tied_is_chance():
    m = ood_metrics([1.0] * 4, [1.0] * 4)
    assert m["auroc"] == pytest.approx(0.5)
    assert m["detection_error"] == pytest.approx(0.5)


def test_values_in_unit_interval():
    rng = np.random.default_rng(0)
    m = ood_metrics(rng.normal(1, 1, 200), rng.normal(0, 1, 150))
    assert all(0.0 <= v <= 1.0 for v in m.values())
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize("s_in, s_out, match", [
    ([], [1.0], "scores_in is empty"),
    ([1.0], [], "scores_out is empty"),
    ([1.0, np.nan], [0.0], "scores_in contains 1 non-finite"),
    ([1.0], [0.0, np.inf, -np.inf], "scores_out contains 2 non-finite"),
])
def test_invalid_scores(s_in, s_out, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(s_in, s_out)
    with pytest.raises(ValueError, match=match):
        fpr_at_tpr(s_in, s_out, 0.95)


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5])
def test_invalid_tpr(tpr):
    with pytest.raises(ValueError, match="tpr must be in"):
        fpr_at_tpr([1.0], [0.0], tpr)
