"""The per-location normative model (LocationGaussian) and the denoising residuals it is fed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neuro_ood.features import denoising_residuals, voxel_feature_maps
from neuro_ood.scorers.location import LocationGaussian


def test_location_gaussian_against_hand_computed_values():
    X = np.array([[[[1.0, 2.0]]], [[[3.0, 2.0]]]])            # (N=2, F=1, 1, 2)
    model = LocationGaussian(scale_floor=0.5).fit(X)
    np.testing.assert_allclose(model.mean_, [[[2.0, 2.0]]])
    np.testing.assert_allclose(model.scale_, [[[1.0 + 0.5, 0.0 + 0.5]]])   # population SD + floor
    new = np.array([[[[5.0, 3.0]]]])
    np.testing.assert_allclose(model.zscores(new), [[[[2.0, 2.0]]]])
    np.testing.assert_allclose(model.score_samples(new), [[[-2.0, -2.0]]])


def test_location_gaussian_rms_over_features_partial_fit_and_state():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(6, 2, 3, 4, 5))
    whole = LocationGaussian().fit(X)
    parts = LocationGaussian().partial_fit(X[:2]).partial_fit(X[2:])
    np.testing.assert_allclose(parts.mean_, whole.mean_, rtol=1e-6)
    np.testing.assert_allclose(parts.scale_, whole.scale_, rtol=1e-6)
    new = rng.normal(size=(2, 2, 3, 4, 5))
    z = (new - whole.mean_) / whole.scale_
    np.testing.assert_allclose(whole.score_samples(new), -np.sqrt((z ** 2).mean(axis=1)), rtol=1e-5)
    np.testing.assert_allclose(whole.mean_squares(new, [[0], [0, 1]]),
                               np.stack([z[:, 0] ** 2, (z ** 2).mean(axis=1)], axis=1), rtol=1e-5)
    again = LocationGaussian.from_state(*whole.get_state())
    np.testing.assert_array_equal(again.score_samples(new), whole.score_samples(new))
    with pytest.raises(ValueError, match="differ"):
        whole.zscores(new[:, :, :2])


def test_search_radius_forgives_a_one_voxel_shift_but_not_a_lesion():
    rng = np.random.default_rng(1)
    edge = np.zeros((1, 12, 12, 12))
    edge[:, :, :, 6:] = 1.0                                  # a tissue boundary at x = 6
    X = edge[None] + rng.normal(scale=0.05, size=(8, 1, 12, 12, 12))
    new = np.roll(edge, 1, axis=-1)[None].copy()             # the boundary one voxel off
    new[0, 0, 2:5, 2:5, 2:5] = 3.0                           # a 3-voxel bright lesion where the norm is 0
    strict = -LocationGaussian(search_radius=0).fit(X).score_samples(new)[0]
    tolerant = -LocationGaussian(search_radius=1).fit(X).score_samples(new)[0]
    assert strict[6, 6, 6] > 10                              # the shifted boundary reads as atypical
    assert tolerant[6, 6, 6] < 1                             # ... unless the norm may be one voxel off
    assert tolerant[3, 3, 3] > 10 * tolerant[6, 6, 6]         # the lesion stays far from its norm
    # by hand: the least squared standard score over the norms of the voxel and its 6 face neighbours
    model = LocationGaussian(search_radius=1).fit(X)
    shifts = [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    assert sorted(model.search_offsets()) == sorted(shifts) and model.search_offsets()[0] == (0, 0, 0)
    assert len(LocationGaussian(search_radius=3).fit(X).search_offsets()) == 123   # the ball, not the cube
    by_hand = min(((new[0, 0, 6, 6, 6] - np.roll(model.mean_, s, axis=(1, 2, 3))[0, 6, 6, 6])
                   / np.roll(model.scale_, s, axis=(1, 2, 3))[0, 6, 6, 6]) ** 2 for s in shifts)
    assert tolerant[6, 6, 6] == pytest.approx(np.sqrt(by_hand), rel=1e-5)


class _Shrink(nn.Module):
    """The exact score of N(c, σ²)-noised images of the constant c: s(x̃, σ) = −(x̃ − c)/σ², so
    the Tweedie estimate x̃ + σ² s is c whatever the noise."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, sigma):
        return -(x - self.c) / sigma.view(-1, *([1] * (x.dim() - 1))) ** 2


def test_denoising_residuals_of_an_exact_denoiser():
    x = torch.rand(3, 1, 4, 5, 6)
    sigmas = torch.tensor([1.0, 0.3])
    residual = denoising_residuals(_Shrink(0.5), x, sigmas, draws=3, seed=1, batch_size=4)
    assert residual.shape == (3, 2, 1, 4, 5, 6)
    np.testing.assert_allclose(residual, np.broadcast_to((0.5 - x.numpy())[:, None], residual.shape), atol=1e-5)
    maps = voxel_feature_maps(_Shrink(0.5), x, sigmas, ("image", "residual"), draws=1)
    assert maps.shape == (3, 3, 4, 5, 6)
    np.testing.assert_allclose(maps[:, 0], x[:, 0].numpy())


class _Conv(nn.Module):
    """A σ-free stand-in score network."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1)

    def forward(self, x, sigma):
        return self.conv(x)


def test_denoising_residuals_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model, x = _Conv(), torch.rand(2, 1, 4, 4, 4)
    together = denoising_residuals(model, x, torch.tensor([0.5]), draws=2, seed=3)
    alone = denoising_residuals(model, x[1:], torch.tensor([0.5]), draws=2, seed=3)
    np.testing.assert_allclose(together[1:], alone, rtol=1e-5, atol=1e-6)
