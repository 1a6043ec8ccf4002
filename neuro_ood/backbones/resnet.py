"""ResNet classifier network on MONAI ResNets, as in MSMA (ICLR 2021, A.2): ResNet trunk, global
average pooling, a dense layer of 1024 nodes and the class logits.

The module knows nothing of MRI: inputs are ``(B, C, H, W)`` (or ``(B, C, D, H, W)`` with
``spatial_dims=3``). Training is in :class:`neuro_ood.detectors.resnet.ResNetDetector`
(:func:`~neuro_ood.trainer.steps.classifier_step_fn`), the scores computed from
the logits in :mod:`neuro_ood.features` (:func:`~neuro_ood.features.classifier_scores`).
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet
from torch import nn

#: depth -> (MONAI block, blocks per stage); the standard He et al. / Hara et al. layouts.
RESNET_LAYOUTS: dict[int, tuple[str, list[int]]] = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}


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
