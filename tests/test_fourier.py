"""Fourier amplitude/phase mixing analysis (Schirrmeister et al. 2020, supplement S3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuro_ood.analysis import (
    FourierMixResult,
    amplitude_phase_pairs,
    fourier_likelihood_analysis,
    mix_amplitude_phase,
)
from neuro_ood.analysis.fourier import _mix_unclipped


def _random_images(n=5, c=3, h=12, w=16, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, (n, c, h, w))


def _blob_images(n, seed, c=2, h=24, w=32):
    """A Gaussian blob (random width and horizontal position) on a background plus smooth noise.

    The blob width and the noise smoothness set the amplitude spectrum; the blob position
    lives in the phases only (a circular shift changes no amplitude).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    widths = rng.uniform(1.5, 4.0, n)
    xs = rng.uniform(0.25 * w, 0.75 * w, n)
    ys = h / 2 + rng.uniform(-2.0, 2.0, n)
    cutoffs = rng.uniform(0.05, 0.5, n)
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    images = np.empty((n, c, h, w))
    for i in range(n):
        blob = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * widths[i] ** 2))
        noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((c, h, w)))
                             * np.exp(-(radius / cutoffs[i]) ** 2)).real
        images[i] = 0.25 + 0.5 * blob + 0.05 * noise / (noise.std() + 1e-12)
    return np.clip(images, 0.0, 1.0)


def _neg_high_frequency_energy(x):
    """Depends on the amplitude spectrum only: -sum |F(k)|^2 |k|^2 over channels."""
    x = np.asarray(x, dtype=np.float64)
    h, w = x.shape[-2:]
    k2 = np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2
    return -(np.abs(np.fft.fft2(x)) ** 2 * k2).sum(axis=(1, 2, 3))


def _left_minus_right(x):
    """Depends on the spatial layout (phase): mean of the left half minus the right half."""
    x = np.asarray(x, dtype=np.float64)
    half = x.shape[-1] // 2
    return x[..., :half].mean(axis=(1, 2, 3)) - x[..., half:].mean(axis=(1, 2, 3))


# --------------------------------------------------------------------------- mixing


def test_mixing_an_image_with_itself_returns_it():
    x = _random_images()
    np.testing.assert_allclose(_mix_unclipped(x, x), x, atol=1e-10)
    np.testing.assert_allclose(mix_amplitude_phase(x, x), x, atol=1e-5)


def test_shift_lives_in_the_phase():
    # A circular shift leaves the amplitude spectrum unchanged, so the mix is the phase source.
    x = _random_images(seed=1)
    shifted = np.roll(x, (3, -5), axis=(-2, -1))
    np.testing.assert_allclose(mix_amplitude_phase(x, shifted), shifted, atol=1e-5)
    np.testing.assert_allclose(mix_amplitude_phase(shifted, x), x, atol=1e-5)


def test_unclipped_mix_has_amplitude_of_first_and_phase_of_second():
    a, p = _random_images(seed=2), _random_images(seed=3)
    mixed = _mix_unclipped(a, p)
    f_mixed, f_a, f_p = (np.fft.fft2(v, axes=(-2, -1)) for v in (mixed, a, p))
    np.testing.assert_allclose(np.abs(f_mixed), np.abs(f_a), atol=1e-9 * np.abs(f_a).max())
    mask = (np.abs(f_a) > 1e-6 * np.abs(f_a).max()) & (np.abs(f_p) > 1e-6 * np.abs(f_p).max())
    assert mask.mean() > 0.99
    phase_error = np.abs(np.exp(1j * np.angle(f_mixed[mask])) - np.exp(1j * np.angle(f_p[mask])))
    assert phase_error.max() < 1e-6


def test_mix_is_clipped_float32_with_input_shape():
    a, p = _random_images(n=4, c=1, h=9, w=14, seed=4), _random_images(n=4, c=1, h=9, w=14, seed=5)
    raw = _mix_unclipped(a, p)
    assert raw.min() < 0.0 or raw.max() > 1.0          # the mix does leave the range ...
    mixed = mix_amplitude_phase(a, p)
    assert mixed.shape == a.shape and mixed.dtype == np.float32
    assert mixed.min() >= 0.0 and mixed.max() <= 1.0   # ... so it is clipped back
    np.testing.assert_allclose(mixed, np.clip(raw, 0, 1), atol=1e-6)
    # DC (mean intensity) comes from the amplitude source.
    np.testing.assert_allclose(raw.mean(axis=(-2, -1)), a.mean(axis=(-2, -1)), atol=1e-12)


@pytest.mark.parametrize("amp, pha", [
    (np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 5))),   # shape mismatch
    (np.zeros((1, 4, 4)), np.zeros((1, 4, 4))),         # not (N, C, H, W)
    (np.full((1, 1, 4, 4), 1.5), np.zeros((1, 1, 4, 4))),  # out of [0, 1]
    (np.full((1, 1, 4, 4), np.nan), np.zeros((1, 1, 4, 4))),
])
def test_mix_rejects_bad_input(amp, pha):
    with pytest.raises(ValueError):
        mix_amplitude_phase(amp, pha)


# --------------------------------------------------------------------------- pairing


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100])
def test_pairs_are_permutations_without_fixed_points(n):
    for seed in range(10):
        amp_index, phase_index = amplitude_phase_pairs(n, seed)
        assert amp_index.shape == phase_index.shape == (n,)
        assert sorted(amp_index) == list(range(n)) and sorted(phase_index) == list(range(n))
        assert np.all(amp_index != phase_index)


def test_pairs_are_deterministic_by_seed():
    first, again = amplitude_phase_pairs(50, 7), amplitude_phase_pairs(50, 7)
    other = amplitude_phase_pairs(50, 8)
    assert all(np.array_equal(u, v) for u, v in zip(first, again))
    assert not all(np.array_equal(u, v) for u, v in zip(first, other))


def test_pairs_edge_cases():
    amp_index, phase_index = amplitude_phase_pairs(1, 0)
    assert amp_index.tolist() == [0] and phase_index.tolist() == [0]
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError):
            amplitude_phase_pairs(bad, 0)


# --------------------------------------------------------------------------- analysis


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amplitude_driven_likelihood_follows_amplitude(seed):
    result = fourier_likelihood_analysis(_blob_images(96, 100 + seed), _neg_high_frequency_energy,
                                         seed=seed)
    assert result.spearman_amplitude > 0.95
    assert abs(result.spearman_phase) < 0.4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layout_driven_likelihood_follows_phase(seed):
    result = fourier_likelihood_analysis(_blob_images(96, 100 + seed), _left_minus_right,
                                         seed=seed)
    assert result.spearman_phase > 0.75
    assert abs(result.spearman_amplitude) < 0.4


def test_result_arrays_are_aligned_with_the_pairing():
    images = _blob_images(20, 3)
    result = fourier_likelihood_analysis(images, _neg_high_frequency_energy, seed=5)
    assert isinstance(result, FourierMixResult) and result.n == 20
    for arr in (result.loglik_mixed, result.loglik_amplitude, result.loglik_phase):
        assert arr.shape == (20,) and arr.dtype == np.float64
    original = _neg_high_frequency_energy(images.astype(np.float32))
    np.testing.assert_allclose(result.loglik_amplitude, original[result.amp_index], rtol=1e-6)
    np.testing.assert_allclose(result.loglik_phase, original[result.phase_index], rtol=1e-6)
    mixed = mix_amplitude_phase(images[result.amp_index], images[result.phase_index])
    np.testing.assert_allclose(result.loglik_mixed, _neg_high_frequency_energy(mixed), rtol=1e-6)
    assert np.all(result.amp_index != result.phase_index)


def test_batches_and_torch_outputs_give_the_same_result():
    images = _blob_images(11, 4)
    seen = []

    def torch_fn(batch):
        seen.append((type(batch), batch.dtype, batch.shape))
        return torch.from_numpy(_left_minus_right(batch))

    whole = fourier_likelihood_analysis(images, _left_minus_right, seed=1)
    batched = fourier_likelihood_analysis(images, torch_fn, seed=1, batch_size=4)
    assert all(t is np.ndarray and d == np.float32 and s[0] <= 4 for t, d, s in seen)
    assert batched.spearman_amplitude == pytest.approx(whole.spearman_amplitude)
    assert batched.spearman_phase == pytest.approx(whole.spearman_phase)
    np.testing.assert_allclose(batched.loglik_mixed, whole.loglik_mixed)


def test_constant_likelihood_gives_nan_correlations():
    result = fourier_likelihood_analysis(_blob_images(6, 5), lambda b: np.zeros(len(b)))
    assert np.isnan(result.spearman_amplitude) and np.isnan(result.spearman_phase)


def test_analysis_rejects_bad_likelihoods_and_too_few_images():
    images = _blob_images(6, 6)
    with pytest.raises(ValueError, match="shape"):
        fourier_likelihood_analysis(images, lambda b: np.zeros((len(b), 2)))
    with pytest.raises(ValueError, match="non-finite"):
        fourier_likelihood_analysis(images, lambda b: np.full(len(b), -np.inf))
    with pytest.raises(ValueError, match="at least 3"):
        fourier_likelihood_analysis(images[:2], _left_minus_right)
    with pytest.raises(ValueError):
        fourier_likelihood_analysis(images, _left_minus_right, batch_size=0)
