import numpy as np
import pytest
import torch

from neuro_ood.backbones.resnet import build_resnet
from neuro_ood.config import config_from_dict
from neuro_ood.detectors import build_detector
from neuro_ood.features import (SCORE_KEYS, classifier_scores, in_distribution_probability, msp_score, score_rule,
                                seen_outlier_score)
from neuro_ood.trainer import TrainState, optimization_manager, sample_rows, train_loop
from neuro_ood.trainer.steps import classifier_step_fn


def train_classifier(model, images, labels, until, batch_size=32, lr=1e-3, seed=0, state=None, **loop_kwargs):
    """Adam on the cross-entropy with class-balanced batches on the one loop, as
    :class:`~neuro_ood.detectors.ResNetDetector` trains."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step = classifier_step_fn(model, optimizer, optimization_manager())
    return train_loop(step, sample_rows({"x": images, "y": labels}, batch_size, labels=labels), {"model": optimizer},
                      until, seed=seed, state=state, **loop_kwargs)


def _squares(n_dark: int, n_bright: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 1, 16, 16)`` noisy backgrounds with a dark (label 0) or bright (label 1) 6×6 square at
    a random place, and the ``(N,)`` labels."""
    g = torch.Generator().manual_seed(seed)
    n = n_dark + n_bright
    images = 0.4 + 0.1 * torch.rand(n, 1, 16, 16, generator=g)
    labels = torch.cat([torch.zeros(n_dark), torch.ones(n_bright)]).long()
    for i in range(n):
        r, c = torch.randint(0, 11, (2,), generator=g).tolist()
        images[i, :, r:r + 6, c:c + 6] = 0.9 if labels[i] else 0.05
    return images, labels


@pytest.mark.parametrize("depth", [10, 18, 34])
def test_build_resnet_gives_two_logits_on_90x110_slices(depth):
    torch.manual_seed(0)
    model = build_resnet(depth, widen=0.25, head_hidden=64).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 90, 110)).shape == (2, 2)


def test_build_resnet_50_default_head_and_errors():
    torch.manual_seed(0)
    model = build_resnet(50).eval()
    assert model.head[0].in_features == 2048 and model.head[0].out_features == 1024
    with torch.no_grad():
        assert model(torch.rand(1, 1, 32, 32)).shape == (1, 2)
    assert isinstance(build_resnet(10, widen=0.125, head_hidden=0).head, torch.nn.Linear)
    volume = build_resnet(10, in_channels=2, num_classes=3, spatial_dims=3, widen=0.125).eval()
    with torch.no_grad():
        assert volume(torch.rand(2, 2, 16, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="depth"):
        build_resnet(20)


def test_score_rules_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, 5.0]])
    soft = torch.softmax(logits.double(), 1).numpy()
    assert np.allclose(msp_score(logits), soft.max(1))
    assert np.allclose(in_distribution_probability(logits), soft[:, 0])
    assert np.allclose(in_distribution_probability(logits.numpy(), in_class=1), soft[:, 1])
    for kind in ("probability", "logit"):
        score = seen_outlier_score(logits, kind=kind)
        # Larger outlier output (rows 1 and 3, 3 then 5) -> less inlier-like.
        assert score[3] < score[1] < score[2] < score[0]
    assert np.allclose(seen_outlier_score(logits), -soft[:, 1])
    assert np.allclose(seen_outlier_score(logits, kind="logit"), [0.0, -3.0, -1.0, -5.0])
    with pytest.raises(ValueError):
        seen_outlier_score(logits, kind="max")
    assert score_rule(True) == "outlier_logit" and score_rule(False) == "msp"


def test_balanced_batches_draw_both_classes():
    labels = torch.cat([torch.zeros(200), torch.ones(5)]).long()
    rows = torch.arange(len(labels))
    g = torch.Generator().manual_seed(0)
    balanced = sample_rows({"row": rows, "y": labels}, 32, labels=labels)
    batches = [balanced(g) for _ in range(20)]
    drawn = torch.cat([b["y"] for b in batches])
    assert (drawn == 1).sum().item() == 20 * 16 and (drawn == 0).sum().item() == 20 * 16
    assert all(torch.equal(labels[b["row"]], b["y"]) for b in batches)     # images and labels stay paired
    batch = sample_rows({"y": labels}, 33, labels=labels)(g)["y"]
    assert len(batch) == 33 and set(batch.tolist()) == {0, 1}
    plain = torch.cat([sample_rows({"y": labels}, 32)(g)["y"] for _ in range(20)])
    assert (plain == 1).float().mean() < 0.1


def test_training_separates_squares_and_p_in_ranks_inliers_first():
    images, labels = _squares(48, 48, seed=0)
    torch.manual_seed(0)
    model = build_resnet(10, widen=0.125, head_hidden=32)
    losses = []
    state = train_classifier(model, images, labels, 40, batch_size=16, lr=3e-3, seed=0,
                             on_step=lambda step, loss: losses.append(loss))
    assert state.step == 40 and len(losses) == 40 and np.mean(losses[-10:]) < np.mean(losses[:10])
    test_images, test_labels = _squares(32, 32, seed=1)
    scores = classifier_scores(model, test_images, batch_size=20, seen_group=True)
    assert set(SCORE_KEYS) <= set(scores) and all(v.shape == (64,) for v in scores.values())
    accuracy = ((scores["p_in"] < 0.5) == test_labels.numpy().astype(bool)).mean()
    assert accuracy >= 0.9
    inlier = test_labels.numpy() == 0
    assert scores["p_in"][inlier].mean() > scores["p_in"][~inlier].mean()
    assert np.array_equal(scores["score"], scores["outlier_logit"])
    assert np.array_equal(classifier_scores(model, test_images, seen_group=False)["score"], scores["msp"])


def test_resume_continues_the_step_count_and_checkpoints():
    images, labels = _squares(20, 5, seed=2)
    torch.manual_seed(0)
    model = build_resnet(10, widen=0.125, head_hidden=16)
    checkpoints = []
    state = train_classifier(model, images, labels, 3, batch_size=8,
                             on_checkpoint=lambda s: checkpoints.append(s.step), checkpoint_every=2)
    assert state.step == 3 and checkpoints == [2, 3] and state.optimizers["model"]["state"]
    steps = []
    state = train_classifier(model, images, labels, 5, batch_size=8, state=state,
                             on_step=lambda step, loss: steps.append(step))
    assert state.step == 5 and steps == [4, 5]
    assert train_classifier(model, images, labels, 5, state=TrainState(step=5)).step == 5


def test_the_detector_refuses_to_train_without_an_outlier_class():
    # The classifier needs a second class: ResNetDetector.fit builds the labels itself (inliers 0,
    # outliers 1) and refuses to train on inliers alone.
    cfg = config_from_dict({"method": "resnet", "resnet": {"depth": 10, "widen": 0.125, "head_hidden": 8},
                            "training": {"steps": 1, "batch_size": 4, "device": "cpu"}})
    images = _squares(4, 0)[0].numpy()
    with pytest.raises(ValueError, match="outlier images"):
        build_detector(cfg).fit(images)
    with pytest.raises(ValueError, match="outlier images"):
        build_detector(cfg).fit(images, outliers=images[:0])
