import numpy as np
import pytest
import torch

from neuro_ood.baselines.classifier import (SCORE_KEYS, build_resnet, classifier_scores, draw_batch_indices,
                                            in_distribution_probability, msp_score, score_rule,
                                            seen_outlier_score, train_classifier)
from neuro_ood.training import TrainState


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
    g = torch.Generator().manual_seed(0)
    drawn = torch.cat([labels[draw_batch_indices(labels, 32, g)] for _ in range(20)])
    assert (drawn == 1).sum().item() == 20 * 16 and (drawn == 0).sum().item() == 20 * 16
    batch = draw_batch_indices(labels, 33, g)
    assert len(batch) == 33 and set(labels[batch].tolist()) == {0, 1}
    plain = torch.cat([labels[draw_batch_indices(labels, 32, g, balance=False)] for _ in range(20)])
    assert (plain == 1).float().mean() < 0.1


def test_training_separates_squares_and_p_in_ranks_inliers_first():
    images, labels = _squares(48, 48, seed=0)
    torch.manual_seed(0)
    model = build_resnet(10, widen=0.125, head_hidden=32)
    losses = []
    state = train_classifier(model, images, labels, steps=40, batch_size=16, lr=3e-3, seed=0,
                             on_step=lambda step, loss: losses.append(loss))
    assert state.step == 40 and len(losses) == 40 and not model.training
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
    state = train_classifier(model, images, labels, steps=3, batch_size=8,
                             on_checkpoint=lambda s: checkpoints.append(s.step), checkpoint_every=2)
    assert state.step == 3 and checkpoints == [2, 3] and state.optimizer is not None
    steps = []
    state = train_classifier(model, images, labels, steps=5, batch_size=8, state=state,
                             on_step=lambda step, loss: steps.append(step))
    assert state.step == 5 and steps == [4, 5]
    assert train_classifier(model, images, labels, steps=5, state=TrainState(step=5)).step == 5
    with pytest.raises(ValueError, match="two classes"):
        train_classifier(model, images, torch.zeros(len(images)), steps=1)
