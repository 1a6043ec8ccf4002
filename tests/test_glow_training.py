import math

import numpy as np
import pytest
import torch
from torch import nn

from neuro_ood.backbones.glow import Glow, GlowOutput
from neuro_ood.backbones.glow_inputs import center_bins, dequantize, to_glow_input
from neuro_ood.config import config_from_dict
from neuro_ood.detectors import GlowDetector
from neuro_ood.errors import ConfigError
from neuro_ood.features import NONFINITE_LOGLIK, glow_anomaly_scores, glow_bits_per_dim, glow_log_likelihoods
from neuro_ood.losses import glow_nll_bits, margin_outlier_loss, outlier_loss
from neuro_ood.trainer import TrainState, merge_samplers, optimization_manager, sample_rows, train_loop
from neuro_ood.trainer.steps import augment_images, glow_step_fn


def _tiny_glow(seed: int = 0) -> Glow:
    torch.manual_seed(seed)
    return Glow(in_channels=1, n_scales=2, steps_per_scale=2, hidden=16)


def _waves(n: int, seed: int) -> torch.Tensor:
    """``(n, 1, 8, 8)`` smooth plane waves of random direction and phase, in [0.15, 0.85]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    return 0.5 + 0.35 * torch.sin(0.6 * (torch.cos(angle) * xx + torch.sin(angle) * yy) + phase)


def _noise(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.35 * (torch.rand(n, 1, 8, 8, generator=g) - 0.5)


def init_actnorm(model: nn.Module, images01: torch.Tensor) -> None:
    """ActNorm data-dependent initialisation of a fresh ``model`` on ``images01`` in [0, 1], as
    :class:`GlowDetector` does before training (:meth:`GlowDetector._init_actnorm`)."""
    detector = GlowDetector(config_from_dict({"method": "glow", "training": {"device": "cpu", "seed": 0}}), "cpu")
    detector.network = model
    detector._init_actnorm(to_glow_input(torch.as_tensor(images01, dtype=torch.float32)))


def train_glow(model: nn.Module, images01: torch.Tensor, until: int, *, batch_size: int = 64, lr: float = 5e-4,
               seed: int = 0, state: TrainState | None = None, warmup_steps: int = 0,
               outliers01: torch.Tensor | None = None, outlier_loss_kind: str = "ratio",
               general_model: nn.Module | None = None, on_step=None, on_checkpoint=None,
               checkpoint_every: int = 1000) -> TrainState:
    """The S4.1 recipe on the one loop, as :meth:`GlowDetector.fit` runs it: ActNorm init of a fresh
    model, Adamax with weight decay, :func:`glow_step_fn` (translations, flips, dequantisation and,
    with ``outliers01``, the outlier loss) on batches from :func:`sample_rows`, up to step ``until``."""
    init_actnorm(model, images01)
    sample = sample_rows({"x": to_glow_input(images01)}, batch_size)
    if outliers01 is not None:
        sample = merge_samplers(sample, sample_rows({"outliers": to_glow_input(outliers01)}, batch_size))
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr, weight_decay=5e-5)
    step = glow_step_fn(model, optimizer, optimization_manager(),
                        outlier_loss_kind=outlier_loss_kind if outliers01 is not None else None,
                        general_model=general_model)
    return train_loop(step, sample, {"model": optimizer}, until, seed=seed, state=state,
                      warmup_steps=warmup_steps, on_step=on_step, on_checkpoint=on_checkpoint,
                      checkpoint_every=checkpoint_every)


class _MinusInfOnBright(nn.Module):
    """A Glow whose log-likelihood terms are −inf for bright inputs (mean above −0.2 in Glow's
    [−0.5, 0.5) scaling, i.e. above 0.3 in [0, 1])."""

    def __init__(self, glow: Glow):
        super().__init__()
        self.glow = glow
        self.n_scales = glow.n_scales

    def forward(self, x: torch.Tensor) -> GlowOutput:
        out = self.glow(x)
        bright = (x.flatten(1).mean(1) > -0.2)[:, None]
        ll = torch.where(bright, torch.full_like(out.log_likelihood, -math.inf), out.log_likelihood)
        return GlowOutput(out.latents, out.log_prior, out.logdet, ll)


def test_to_glow_input_spans_the_glow_range_on_the_bin_grid():
    x = to_glow_input(torch.linspace(0, 1, 1001))
    assert x.min().item() == -0.5 and x.max().item() == 0.5 - 1 / 256
    assert torch.allclose((x + 0.5) * 256, torch.round((x + 0.5) * 256))
    levels = torch.arange(256.0) / 255
    assert torch.equal((to_glow_input(levels) + 0.5) * 256, torch.arange(256.0))


def test_dequantize_stays_within_a_bin_and_center_bins_adds_half_a_bin():
    x = to_glow_input(torch.rand(64, 1, 8, 8), n_bins=32)
    noisy = dequantize(x, n_bins=32, generator=torch.Generator().manual_seed(0))
    assert (noisy >= x).all() and (noisy < x + 1 / 32).all() and not torch.equal(noisy, x)
    assert torch.allclose(center_bins(x, 32), x + 1 / 64)


def test_glow_nll_bits_is_mean_bits_per_dim():
    log_px = torch.tensor([0.0, -64 * math.log(2)])
    # bpd = (−log p + D log 256) / (D log 2) = 8 and 9 bits.
    assert glow_nll_bits(log_px, 64).item() == pytest.approx(8.5)


def test_outlier_loss_matches_eq_s1_and_trains_log_p_in():
    # Differences ±1000·log 3 make σ((log p_g − log p_in)/T) = 3/4 and 1/4.
    log_p_in = torch.tensor([-5000.0, -5000.0], requires_grad=True)
    log_p_g = torch.tensor([-5000.0 + 1000 * math.log(3), -5000.0 - 1000 * math.log(3)])
    loss, n_used = outlier_loss(log_p_in, log_p_g, temperature=1000.0, weight=6000.0)
    assert n_used == 2
    assert loss.item() == pytest.approx(-6000 * (math.log(0.75) + math.log(0.25)) / 2, rel=1e-6)
    loss.backward()
    # d/d log p_in of −λ log σ(u), u = (log p_g − log p_in)/T, is λ (1 − σ(u)) / T, halved by the mean.
    assert log_p_in.grad.tolist() == pytest.approx([6.0 * 0.25 / 2, 6.0 * 0.75 / 2], rel=1e-5)


def test_outlier_loss_safeguard_drops_nonfinite_and_skips_mostly_nonfinite_batches():
    inf = math.inf
    log_p_g = torch.zeros(4)
    log_p_in = torch.tensor([0.0, -inf, 0.0, float("nan")], requires_grad=True)
    loss, n_used = outlier_loss(log_p_in, log_p_g)
    assert n_used == 2 and loss.item() == pytest.approx(6000 * math.log(2))
    loss.backward()
    assert torch.isfinite(log_p_in.grad).all() and log_p_in.grad[1] == 0 and log_p_in.grad[3] == 0

    kept = torch.tensor([-inf, -inf, -inf, 0.0], requires_grad=True)
    loss, n_used = outlier_loss(kept, log_p_g)
    assert n_used == 1 and math.isfinite(loss.item())

    mostly_bad = torch.tensor([-inf, -inf, -inf, -inf, -inf, 0.0, -inf, -inf], requires_grad=True)
    loss, n_used = outlier_loss(mostly_bad, torch.zeros(8))
    assert n_used == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(mostly_bad.grad, torch.zeros(8))


def test_margin_loss_hand_example():
    inliers = torch.tensor([-2.0, -3.0, -1.0], requires_grad=True)
    outliers = torch.tensor([-2.5, -5.0], requires_grad=True)
    # Pairs (−2, −2.5) and (−3, −5) with margin 1: max(0, 0.5) and max(0, −1) -> mean 0.25.
    loss = margin_outlier_loss(inliers, outliers, margin=1.0)
    assert loss.item() == pytest.approx(0.25)
    loss.backward()
    assert outliers.grad.tolist() == [0.5, 0.0] and inliers.grad is None
    both = margin_outlier_loss(inliers, outliers, margin=1.0, detach_inliers=False)
    both.backward()
    assert inliers.grad.tolist() == [-0.5, 0.0, 0.0]


def test_glow_log_likelihoods_are_noise_free_per_scale_and_replace_nonfinite():
    model = _tiny_glow()
    images = torch.cat([_waves(5, 0) * 0.2, _waves(5, 1)])  # 5 dark (mean 0.1), 5 bright (mean 0.5)
    init_actnorm(model, images)
    loglik = glow_log_likelihoods(model, images, batch_size=4)
    assert loglik.shape == (10, 2) and loglik.dtype == np.float64
    with torch.no_grad():
        direct = model(center_bins(to_glow_input(images))).log_likelihood.double().numpy()
    np.testing.assert_allclose(loglik, direct, rtol=1e-5)

    patched = glow_log_likelihoods(_MinusInfOnBright(model), images, batch_size=4)
    assert (patched[5:] == NONFINITE_LOGLIK).all() and NONFINITE_LOGLIK == -3e6
    np.testing.assert_allclose(patched[:5], loglik[:5])


def test_glow_anomaly_scores():
    ll_in = np.array([[-1.0, -2.0, -3.0], [-4.0, -np.inf, -6.0]])
    ll_gen = np.array([[-2.0, -2.0, -2.0], [0.0, 0.0, 0.0]])
    scores = glow_anomaly_scores(ll_in, ll_gen)
    assert set(scores) == {"raw", "last_scale", "diff"}
    np.testing.assert_allclose(scores["raw"], [-6.0, -10.0 - 3e6])
    np.testing.assert_allclose(scores["last_scale"], [-3.0, -6.0])
    np.testing.assert_allclose(scores["diff"], scores["raw"] - ll_gen.sum(1))
    assert set(glow_anomaly_scores(ll_in)) == {"raw", "last_scale"}


def test_augment_translates_with_reflection_and_flips():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(16, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    flipped = augment_images(x, g, ("flip",), 2)
    assert all(torch.equal(f, x[0]) or torch.equal(f, x[0].flip(-1)) for f in flipped)
    assert any(torch.equal(f, x[0].flip(-1)) for f in flipped)
    shifted = augment_images(x, g, ("translate",), 2)
    assert shifted.shape == x.shape and set(shifted.unique().tolist()) <= set(range(64))
    assert any(not torch.equal(s, x[0]) for s in shifted)
    assert torch.equal(augment_images(x, g, (), 2), x)
    # Unknown augmentations are refused when the config is read, before any training.
    with pytest.raises(ConfigError, match="augment"):
        config_from_dict({"method": "glow", "training": {"augment": ["rotate"]}})


def test_train_glow_lowers_bits_per_dim_and_resumes():
    images = _waves(256, 0)
    model = _tiny_glow()
    init_actnorm(model, images)
    before = glow_bits_per_dim(model, images, generator=torch.Generator().manual_seed(0))
    steps = []
    state = train_glow(model, images, 20, lr=2e-3, seed=1, on_step=lambda s, l: steps.append(s))
    assert state.step == 20 and state.optimizers["model"]["state"]
    checkpoints = []
    # A fresh state holding only the step and the optimiser states resumes where the run stopped.
    state = train_glow(model, images, 30, lr=2e-3, seed=1, state=TrainState(state.step, dict(state.optimizers)),
                       on_step=lambda s, l: steps.append(s), on_checkpoint=lambda st: checkpoints.append(st.step),
                       checkpoint_every=5)
    after = glow_bits_per_dim(model, images, generator=torch.Generator().manual_seed(0))
    assert state.step == 30 and state.counters.get("skipped", 0) == 0
    assert steps == list(range(1, 31)) and checkpoints == [25, 30]
    assert after < before - 0.3


def test_warmup_scales_the_learning_rate():
    state = train_glow(_tiny_glow(), _waves(32, 0), 2, batch_size=8, lr=1e-3, warmup_steps=10)
    assert state.optimizers["model"]["param_groups"][0]["lr"] == pytest.approx(2e-4)


def test_outlier_loss_training_widens_the_inlier_outlier_gap():
    inliers, outliers = _waves(256, 0), _noise(256, 1)

    def gap(model):
        return (glow_log_likelihoods(model, inliers).sum(1).mean()
                - glow_log_likelihoods(model, outliers).sum(1).mean())

    plain = _tiny_glow()
    train_glow(plain, inliers, 30, lr=2e-3)
    general = _tiny_glow(1)
    init_actnorm(general, torch.cat([inliers, outliers]))
    with pytest.raises(ValueError, match="general_model"):
        train_glow(_tiny_glow(), inliers, 1, outliers01=outliers)
    with pytest.raises(ValueError, match="outlier_loss_kind"):
        train_glow(_tiny_glow(), inliers, 1, outliers01=outliers, outlier_loss_kind="hinge")
    ratio = _tiny_glow()
    state = train_glow(ratio, inliers, 30, lr=2e-3, outliers01=outliers, general_model=general)
    margin = _tiny_glow()
    train_glow(margin, inliers, 30, lr=2e-3, outliers01=outliers, outlier_loss_kind="margin")
    assert state.counters.get("skipped", 0) == 0
    assert gap(ratio) > gap(plain) and gap(margin) > gap(plain)


def test_outlier_batches_are_skipped_when_mostly_nonfinite():
    inliers = _waves(64, 0) * 0.2
    general = _tiny_glow(1)
    init_actnorm(general, inliers)

    model = _MinusInfOnBright(_tiny_glow())
    init_actnorm(model, inliers)
    initial = [p.detach().clone() for p in model.parameters()]
    state = train_glow(model, inliers, 4, batch_size=8, outliers01=_waves(64, 1), general_model=general)
    assert state.step == 4 and state.counters["skipped"] == 4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), initial))

    half_bright = torch.cat([_waves(32, 2) * 0.2, _waves(32, 3)])
    state = train_glow(model, inliers, 8, batch_size=16, outliers01=half_bright, general_model=general,
                       state=state)
    assert state.step == 8 and state.counters["skipped"] < 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial))
