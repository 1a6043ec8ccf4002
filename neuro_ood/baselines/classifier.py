"""Supervised classifier baseline on MONAI ResNets: Hendrycks & Gimpel (2017) as used by MSMA
(ICLR 2021, Section 5.4 and A.2) and the purely discriminative detector of Schirrmeister et al.
(NeurIPS 2020, S9).

The module knows nothing of MRI: images are ``(B, C, H, W)`` (or ``(B, C, D, H, W)`` with
``spatial_dims=3``) with intensities in [0, 1]. Labels are ``0`` = inlier / in-distribution and
``1`` = outlier / general-domain.

- MSMA 5.4: a ResNet-50 trained to separate inliers (9-11 years) from one outlier group (1-year-olds).
  For groups it never saw the outlier score is the maximum softmax probability; for the group it was
  trained on, the outlier class's output alone (:func:`score_rule` holds this rule).
- Schirrmeister et al. S9: a classifier of in-distribution vs a general-domain set, scored by
  p(in-distribution | x) (:func:`in_distribution_probability`).

Every score here follows the neuro-ood convention: HIGHER = MORE INLIER-LIKE.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from neuro_ood.training import TrainState, report_step

#: depth -> (MONAI block, blocks per stage); the standard He et al. / Hara et al. layouts.
RESNET_LAYOUTS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}

#: Keys of :func:`classifier_scores`; all three are "higher = more inlier-like".
SCORE_KEYS = ("msp", "outlier_logit", "p_in")


class ResNetClassifier(nn.Module):
    """MONAI ResNet trunk (convolutions + global average pooling) and a dense head.

    ``x (B, C, *spatial) -> logits (B, num_classes)``. The head is
    ``Linear(features, head_hidden) -> ReLU -> Linear(head_hidden, num_classes)`` (the paper's dense
    layer of 1024 nodes before the softmax), or a single ``Linear`` with ``head_hidden=0``. The
    softmax is not part of the model: it returns logits, trained with cross-entropy.
    """

    def __init__(self, trunk: nn.Module, n_features: int, num_classes: int, head_hidden: int):
        super().__init__()
        self.trunk = trunk
        self.num_classes = num_classes
        if head_hidden > 0:
            self.head = nn.Sequential(nn.Linear(n_features, head_hidden), nn.ReLU(inplace=True),
                                      nn.Linear(head_hidden, num_classes))
        else:
            self.head = nn.Linear(n_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def build_resnet(depth: int = 50, in_channels: int = 1, num_classes: int = 2, spatial_dims: int = 2,
                 widen: float = 1.0, head_hidden: int = 1024) -> ResNetClassifier:
    """A ResNet classifier as in MSMA A.2: ResNet → global average pooling → dense 1024 → softmax.

    The trunk is MONAI's ``ResNet`` without its final ``fc`` (``feed_forward=False``; it already ends
    in global average pooling), with the standard ImageNet stem of He et al. (7×7 convolution of
    stride 2, then 3×3 max pooling of stride 2; MONAI's default stem stride is 1) and type-B
    (projection) shortcuts, so the total stride is 32 and 90×110 slices need no resizing. Weights are
    randomly initialised (the paper's Keras ResNet50 pretrained weights are not available here).

    Parameters
    ----------
    depth : int
        10, 18, 34 (basic blocks) or 50 (bottleneck blocks).
    in_channels : int
        Image channels ``C``.
    num_classes : int
        Output logits; 2 for inlier vs outlier.
    spatial_dims : int
        2 for ``(B, C, H, W)`` images, 3 for volumes.
    widen : float
        Multiplies the stage widths (64, 128, 256, 512); below 1 for small CPU models.
    head_hidden : int
        Width of the hidden dense layer (ReLU) of the head, 1024 as in the paper; 0 for a single
        linear layer on the pooled features.

    Returns
    -------
    ResNetClassifier
        ``x (B, in_channels, *spatial) -> logits (B, num_classes)``.
    """
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"unsupported ResNet depth {depth}; use one of {sorted(RESNET_LAYOUTS)}")
    if widen <= 0 or int(64 * widen) < 1:
        raise ValueError(f"widen must give at least one channel in the first stage, got {widen}")
    if head_hidden < 0:
        raise ValueError(f"head_hidden must be >= 0 (0 disables the hidden layer), got {head_hidden}")
    block, layers = RESNET_LAYOUTS[depth]
    trunk = ResNet(block=block, layers=layers, block_inplanes=[64, 128, 256, 512], spatial_dims=spatial_dims,
                   n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, no_max_pool=False,
                   shortcut_type="B", widen_factor=widen, num_classes=num_classes, feed_forward=False)
    expansion = 4 if block == "bottleneck" else 1
    n_features = int(512 * widen) * expansion
    return ResNetClassifier(trunk, n_features, num_classes, head_hidden)


def draw_batch_indices(labels: torch.Tensor, batch_size: int, generator: torch.Generator,
                       balance: bool = True) -> torch.Tensor:
    """Indices ``(B,)`` of one training batch, ``B = min(batch_size, N)``, drawn with replacement.

    With ``balance`` each class present in ``labels (N,)`` gets ``B // K`` slots (the first
    ``B % K`` classes one more), filled uniformly from that class, so a small outlier group is
    drawn as often as the inliers; without it the ``B`` indices are uniform over all ``N``.
    """
    labels = torch.as_tensor(labels)
    size = min(batch_size, len(labels))
    if not balance:
        return torch.randint(len(labels), (size,), generator=generator)
    classes = torch.unique(labels)
    parts = []
    for i, cls in enumerate(classes.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        count = size // len(classes) + (1 if i < size % len(classes) else 0)
        parts.append(members[torch.randint(len(members), (count,), generator=generator)])
    index = torch.cat(parts)
    return index[torch.randperm(len(index), generator=generator)]


def train_classifier(model: nn.Module, images01: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                     steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, balance: bool = True,
                     state: TrainState | None = None,
                     on_step: Callable[[int, float], None] | None = None,
                     on_checkpoint: Callable[[TrainState], None] | None = None,
                     checkpoint_every: int = 1000) -> TrainState:
    """Adam (default settings, as in MSMA A.2) on the cross-entropy for ``steps`` steps in all,
    resuming from ``state``. No augmentation.

    Parameters
    ----------
    model : nn.Module
        ``x (B, C, H, W) -> logits (B, K)`` (:func:`build_resnet`).
    images01 : Tensor or array
        ``(N, C, H, W)`` training images, intensities in [0, 1].
    labels : Tensor or array
        ``(N,)`` integer classes: 0 = inlier / in-distribution, 1 = outlier / general domain; at
        least two classes must be present.
    steps : int
        Total number of steps (batches), counting those of the run being resumed.
    balance : bool
        Draw class-balanced batches (:func:`draw_batch_indices`); the outlier group may be small.
    state : TrainState, optional
        Where to resume (step and optimiser state).
    on_step : callable, optional
        Called with (step, loss) after every step.
    on_checkpoint : callable, optional
        Called with the state every ``checkpoint_every`` steps and at the end.

    Returns
    -------
    TrainState
        Step reached and optimiser state. Batches come from a generator seeded with
        ``seed + state.step``, so a resumed run is reproducible too. The model is left in eval mode.
    """
    images = torch.as_tensor(images01, dtype=torch.float32)
    labels = torch.as_tensor(labels).long()
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be (N,) with N = {len(images)} images, got shape {tuple(labels.shape)}")
    if (labels < 0).any():
        raise ValueError("labels must be non-negative class indices (0 = inlier, 1 = outlier)")
    if len(torch.unique(labels)) < 2:
        raise ValueError("train_classifier needs examples of at least two classes")
    state = state or TrainState()
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    generator = torch.Generator().manual_seed(seed + state.step)
    model.train()
    for step in range(state.step, steps):
        index = draw_batch_indices(labels, batch_size, generator, balance)
        logits = model(images[index].to(device))
        loss = F.cross_entropy(logits, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report_step(state, steps, loss.item(), lambda: setattr(state, "optimizer", optimizer.state_dict()),
                    on_step, on_checkpoint, checkpoint_every)
    state.optimizer = optimizer.state_dict()
    model.eval()
    return state


def _probabilities(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    logits = torch.as_tensor(logits).detach().double().cpu()
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    return torch.softmax(logits, dim=1)


def msp_score(logits: torch.Tensor | np.ndarray) -> np.ndarray:
    """Maximum softmax probability (Hendrycks & Gimpel 2017), for groups the classifier never saw.

    ``logits (B, K) -> (B,)`` float64 in [1/K, 1]; higher = more inlier-like (a confident
    prediction of any training class).
    """
    return _probabilities(logits).max(dim=1).values.numpy()


def seen_outlier_score(logits: torch.Tensor | np.ndarray, outlier_class: int = 1, kind: str = "probability"
                       ) -> np.ndarray:
    """Score of the outlier group the classifier was trained on (MSMA A.2): its class output alone.

    The paper reports the 1-year-old metrics "using the logits corresponding to the outlier class
    only in lieu of taking the max across both classes". Its Keras model ends in a softmax, so the
    outputs it read are the softmax probabilities; the default here is therefore
    ``−p(outlier | x)``. With two classes this ranks exactly like p(in | x) (S9). ``kind="logit"``
    gives ``−logit_outlier`` instead (the pre-softmax output; only logit differences are
    constrained by the cross-entropy, so this is the noisier reading).

    ``logits (B, K) -> (B,)`` float64; higher = more inlier-like (a larger outlier output ranks a
    sample as more outlying).
    """
    if kind == "probability":
        return -_probabilities(logits)[:, outlier_class].numpy()
    if kind == "logit":
        logits = torch.as_tensor(logits).detach().double().cpu()
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
        return -logits[:, outlier_class].numpy()
    raise ValueError(f"kind must be 'probability' or 'logit', got {kind!r}")


def in_distribution_probability(logits: torch.Tensor | np.ndarray, in_class: int = 0) -> np.ndarray:
    """p(in-distribution | x), the anomaly metric of the discriminative baseline (Schirrmeister et
    al. 2020, S9). ``logits (B, K) -> (B,)`` float64 in [0, 1]; higher = more inlier-like."""
    return _probabilities(logits)[:, in_class].numpy()


def score_rule(seen: bool) -> str:
    """The one place holding MSMA A.2's rule for which :func:`classifier_scores` key to report.

    For the outlier group the classifier was trained on (``seen=True``, the 1-year-olds) the paper
    uses the outlier class's output alone: ``"outlier_logit"`` (:func:`seen_outlier_score`). For
    groups it never saw it follows Hendrycks & Gimpel and uses the maximum softmax probability:
    ``"msp"`` (:func:`msp_score`). The S9 variant uses ``"p_in"`` for every group.
    """
    return "outlier_logit" if seen else "msp"


@torch.no_grad()
def classifier_logits(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Logits ``(N, K)`` (CPU, float32) of ``images01 (N, C, H, W)`` in [0, 1], in eval mode without
    gradients; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images01 = torch.as_tensor(images01, dtype=torch.float32)
    rows = [model(images01[start:start + batch_size].to(device)).float().cpu()
            for start in range(0, len(images01), batch_size)]
    model.train(was_training)
    if not rows:
        return torch.zeros(0, getattr(model, "num_classes", 2))
    return torch.cat(rows)


def classifier_scores(model: nn.Module, images01: torch.Tensor | np.ndarray, batch_size: int = 64,
                      seen_group: bool | None = None, in_class: int = 0, outlier_class: int = 1,
                      outlier_kind: str = "probability") -> dict[str, np.ndarray]:
    """All classifier scores of ``images01 (N, C, H, W)`` in [0, 1]; each ``(N,)`` float64,
    HIGHER = MORE INLIER-LIKE.

    Returns
    -------
    dict
        ``"msp"`` (:func:`msp_score`), ``"outlier_logit"`` (:func:`seen_outlier_score` with
        ``outlier_kind``) and ``"p_in"`` (:func:`in_distribution_probability`). With ``seen_group``
        given, also ``"score"``: the entry :func:`score_rule` picks for a group the classifier was
        (``True``) or was not (``False``) trained on.
    """
    logits = classifier_logits(model, images01, batch_size)
    scores = {
        "msp": msp_score(logits),
        "outlier_logit": seen_outlier_score(logits, outlier_class, outlier_kind),
        "p_in": in_distribution_probability(logits, in_class),
    }
    if seen_group is not None:
        scores["score"] = scores[score_rule(bool(seen_group))]
    return scores
