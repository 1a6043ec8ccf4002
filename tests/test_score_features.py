import numpy as np
import pytest
import torch
from torch import nn

from neuro_ood.features import score_feature_size, score_features, score_norms


class PointMassScore(nn.Module):
    """s(x, σ) = -x / σ²: the exact score of data at 0, so σ·s = -x / σ."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x, sigma):
        return -x / sigma.view(-1, *([1] * (x.dim() - 1))) ** 2


def test_band_features_match_hand_computed_values():
    # One 1×2×3 image: intensities 0.05 (below the range: no band), 0.2, 0.3 (band 0 of [0.1, 0.5)),
    # 0.6, 0.9 (band 1 of [0.5, 0.9]) and exactly 0.9 (the top edge belongs to the last band).
    x = torch.tensor([[[[0.05, 0.2, 0.3], [0.6, 0.9, 0.9]]]])
    sigmas = torch.tensor([1.0, 0.5])
    features = score_features(PointMassScore(), x, sigmas, kinds=("norms", "band_means", "band_rms"),
                              bands=2, band_range=(0.1, 0.9))
    assert features.shape == (1, score_feature_size(("norms", "band_means", "band_rms"), 2, 1, 2)) == (1, 10)
    values = x.flatten().numpy().astype(np.float64)
    for i, sigma in enumerate([1.0, 0.5]):
        scaled = -values / sigma
        assert features[0, i] == pytest.approx(np.linalg.norm(scaled), rel=1e-6)
        low, high = scaled[1:3], scaled[3:]
        assert features[0, 2 + 2 * i] == pytest.approx(low.mean(), rel=1e-6)
        assert features[0, 3 + 2 * i] == pytest.approx(high.mean(), rel=1e-6)
        assert features[0, 6 + 2 * i] == pytest.approx(np.sqrt((low ** 2).mean()), rel=1e-6)
        assert features[0, 7 + 2 * i] == pytest.approx(np.sqrt((high ** 2).mean()), rel=1e-6)


def test_norm_features_equal_score_norms_and_empty_bands_are_zero():
    torch.manual_seed(0)
    x = torch.rand(5, 2, 6, 7) * 0.5            # nothing in the upper half of [0, 1]
    sigmas = torch.tensor([1.0, 0.1, 0.01])
    net = PointMassScore()
    features = score_features(net, x, sigmas, kinds=("norms", "band_means"), bands=2, band_range=(0.0, 1.0),
                              batch_size=6)
    np.testing.assert_allclose(features[:, :3], score_norms(net, x, sigmas), rtol=1e-6)
    band_means = features[:, 3:].reshape(5, 3, 2, 2)          # (N, L, C, bands)
    assert np.all(band_means[..., 1] == 0) and np.all(band_means[..., 0] < 0)
    assert score_features(net, x[:0], sigmas, kinds=("band_rms",), bands=4).shape == (0, 3 * 2 * 4)


def test_unknown_feature_is_refused():
    with pytest.raises(ValueError, match="unknown score feature"):
        score_features(PointMassScore(), torch.rand(1, 1, 4, 4), torch.tensor([1.0]), kinds=("grid",))
