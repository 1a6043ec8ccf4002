import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from neuro_ood.backbones.fanogan import Critic, Encoder, FAnoGAN, Generator, sample_latent
from neuro_ood.detectors.fanogan import frozen
from neuro_ood.losses import gradient_penalty, izif_loss, wgan_critic_loss, wgan_generator_loss
from neuro_ood.trainer import TrainState, optimization_manager, sample_rows, train_loop
from neuro_ood.trainer.steps import izif_step_fn, wgan_gp_step_fn


SIZE = (12, 14)
LATENT = 8
WIDTH = 4


def _nets(seed: int = 0, size=SIZE):
    torch.manual_seed(seed)
    return (Generator(LATENT, 1, size, WIDTH), Critic(1, size, WIDTH), Encoder(1, size, LATENT, WIDTH))


def _waves(n: int, seed: int, size=SIZE) -> torch.Tensor:
    """``(n, 1, H, W)`` smooth plane waves of random direction and phase, in [0.15, 0.85]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size[0])), torch.arange(float(size[1])), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    return 0.5 + 0.35 * torch.sin(0.6 * (torch.cos(angle) * xx + torch.sin(angle) * yy) + phase)


def train_wgan_gp(generator, critic, images, until, *, batch_size=8, n_critic=2, lr=2e-4, betas=(0.5, 0.999),
                  seed=0, state=None, **loop_kwargs) -> TrainState:
    """f-AnoGAN stage 1 on the one loop, as :class:`~neuro_ood.detectors.FAnoGANDetector` runs it:
    ``n_critic`` real batches per generator step (``sample_rows(..., draws=n_critic)``)."""
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    step = wgan_gp_step_fn(generator, critic, opt_g, opt_d, optimization_manager())
    return train_loop(step, sample_rows({"x": images}, batch_size, draws=n_critic),
                      {"generator": opt_g, "critic": opt_d}, until, seed=seed, state=state, **loop_kwargs)


def train_izif_encoder(encoder, generator, critic, images, until, *, batch_size=16, lr=2e-4, betas=(0.5, 0.999),
                       seed=0, state=None, **loop_kwargs) -> TrainState:
    """f-AnoGAN stage 2 on the one loop: the encoder trained on the izif loss with G and D
    :func:`frozen` for the stage, as :class:`~neuro_ood.detectors.FAnoGANDetector` does."""
    optimizer = torch.optim.Adam(encoder.parameters(), lr=lr, betas=betas)
    step = izif_step_fn(encoder, generator, critic, optimizer, optimization_manager())
    with frozen(generator, critic):
        return train_loop(step, sample_rows({"x": images}, batch_size), {"encoder": optimizer}, until, seed=seed,
                          state=state, **loop_kwargs)


class _UnitLinearCritic(nn.Module):
    """``D(x) = w · flatten(x)`` with ‖w‖₂ = 1: 1-Lipschitz with gradient norm exactly 1 everywhere."""

    def __init__(self, n_dims: int, seed: int = 0):
        super().__init__()
        w = torch.randn(n_dims, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.w = nn.Parameter(w / w.norm())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w


def test_gradient_penalty_is_positive_for_a_random_critic_and_trains_it():
    _, critic, _ = _nets()
    real, fake = _waves(6, 0), torch.rand(6, 1, *SIZE, generator=torch.Generator().manual_seed(1))
    gp = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(2))
    assert gp.dim() == 0 and torch.isfinite(gp) and gp.item() > 0
    gp.backward()
    # The output bias does not change ∇ₓD, so it gets no gradient (and a bias right before a
    # piecewise-linear activation gets zero); every weight gets a non-zero one.
    grads = {name: p.grad for name, p in critic.named_parameters()}
    assert grads.pop("output.bias") is None
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum().item() > 0 for name, g in grads.items() if name.endswith("weight"))


def test_gradient_penalty_vanishes_for_a_unit_linear_critic():
    critic = _UnitLinearCritic(SIZE[0] * SIZE[1])
    g = torch.Generator().manual_seed(0)
    real = torch.rand(8, 1, *SIZE, generator=g, dtype=torch.float64)
    fake = torch.rand(8, 1, *SIZE, generator=g, dtype=torch.float64)
    gp = gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
    assert abs(gp.item()) < 1e-10
    gp.backward()
    assert critic.w.grad.abs().max().item() < 1e-6
    # Scaling w by 2 makes the gradient norm 2: penalty (2 − 1)² = 1.
    with torch.no_grad():
        critic.w.mul_(2.0)
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(1.0, abs=1e-6)


def test_wgan_losses_are_the_critic_differences_plus_the_weighted_penalty():
    critic = _UnitLinearCritic(SIZE[0] * SIZE[1])
    with torch.no_grad():
        critic.w.mul_(2.0)  # penalty 1, so its weight shows
    g = torch.Generator().manual_seed(0)
    real = torch.rand(6, 1, *SIZE, generator=g, dtype=torch.float64)
    fake = torch.rand(6, 1, *SIZE, generator=g, dtype=torch.float64)
    d_fake, d_real = critic(fake).mean().item(), critic(real).mean().item()
    loss = wgan_critic_loss(critic, real, fake, 10.0, torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(d_fake - d_real + 10.0, abs=1e-6)
    loss.backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum().item() > 0
    assert wgan_generator_loss(critic, fake).item() == pytest.approx(-d_fake, abs=1e-12)


@pytest.mark.parametrize("size", [(12, 14), (13, 17), (16, 16), (7, 9), (45, 55)])
def test_networks_fit_any_image_size(size):
    generator, critic, encoder = _nets(size=size)
    z = sample_latent(3, LATENT, torch.Generator().manual_seed(0))
    assert z.shape == (3, LATENT) and z.abs().max() <= 1
    x = generator(z)
    assert x.shape == (3, 1, *size)
    assert x.min() >= 0 and x.max() <= 1
    assert critic(x).shape == (3,)
    features = critic.features(x)
    assert features.shape == (3, critic.feature_dim) and critic.feature_dim > 0
    code = encoder(x)
    assert code.shape == (3, LATENT) and code.abs().max() < 1
    with pytest.raises(ValueError):
        critic(torch.rand(2, 1, size[0] + 1, size[1]))


def test_generator_crops_the_padded_output_to_the_centre():
    generator = Generator(LATENT, 2, (13, 17), WIDTH)
    assert generator.padded_size[0] >= 13 and generator.padded_size[1] >= 17
    assert generator.padded_size[0] % 2 ** generator.n_up == 0 and generator.padded_size[1] % 2 ** generator.n_up == 0
    assert generator(torch.zeros(2, LATENT)).shape == (2, 2, 13, 17)


@pytest.mark.parametrize("kappa", [1.0, 3.0])
def test_anomaly_score_is_image_residual_plus_kappa_times_feature_residual(kappa):
    torch.manual_seed(1)
    model = FAnoGAN(in_channels=1, image_size=SIZE, latent_dim=LATENT, width=WIDTH, kappa=kappa)
    generator, critic, encoder = model.generator, model.critic, model.encoder
    # Some batch-norm statistics, so the score really uses eval mode.
    model.train()
    with torch.no_grad():
        generator(sample_latent(16, LATENT, torch.Generator().manual_seed(3)))
    x = _waves(5, 4)
    score = model.score(x, batch_size=2)
    assert generator.training and encoder.training and critic.training  # modes restored

    generator.eval(), critic.eval(), encoder.eval()
    with torch.no_grad():
        recon = generator(encoder(x))
        res_img = ((x - recon) ** 2).mean(dim=(1, 2, 3)).numpy()
        res_fts = ((critic.features(x) - critic.features(recon)) ** 2).mean(dim=1).numpy()
    assert score.shape == (5,)
    # The two terms differ, so swapped weights would not pass unnoticed.
    assert not np.allclose(res_img, res_fts, rtol=0.1)
    np.testing.assert_allclose(score.numpy(), res_img + kappa * res_fts, rtol=1e-6)
    # κ weighs only the feature residual.
    score_k0 = model.score(x, kappa=0.0)
    np.testing.assert_allclose(score_k0.numpy(), res_img, rtol=1e-6)
    np.testing.assert_allclose((score - score_k0).numpy(), kappa * res_fts, rtol=1e-5, atol=1e-12)
    # izif_loss is the batch mean of the same sum.
    assert izif_loss(x, encoder, generator, critic, kappa).item() == pytest.approx(
        float((res_img + kappa * res_fts).mean()), rel=1e-5)
    # The residual map is the image residual before its mean over pixels.
    model.train()
    np.testing.assert_allclose(model.residual_map(x).mean(dim=(1, 2, 3)).numpy(), res_img, rtol=1e-5)
    assert generator.training and encoder.training


def test_encoder_training_lowers_the_izif_residual_and_leaves_g_and_d_alone():
    generator, critic, encoder = _nets(3)
    images = _waves(32, 5)
    # A few GAN steps first: an untrained generator's output hardly depends on z.
    train_wgan_gp(generator, critic, images, 50, batch_size=16, n_critic=2, lr=1e-3)
    generator.train()
    critic.train()
    g_before = {k: v.clone() for k, v in generator.state_dict().items()}
    d_before = {k: v.clone() for k, v in critic.state_dict().items()}
    with torch.no_grad():
        generator.eval()
        before = izif_loss(images, encoder, generator, critic).item()
        generator.train()
    seen = []
    state = train_izif_encoder(encoder, generator, critic, images, 100, batch_size=16, lr=2e-3, seed=0,
                               on_step=lambda step, loss: seen.append(step))
    assert state.step == 100 and seen == list(range(1, 101)) and state.optimizers["encoder"]["state"]
    with torch.no_grad():
        generator.eval()
        after = izif_loss(images, encoder, generator, critic).item()
        generator.train()
    assert after < 0.6 * before
    # G and D untouched (batch-norm statistics included), modes and flags restored.
    assert all(torch.equal(v, g_before[k]) for k, v in generator.state_dict().items())
    assert all(torch.equal(v, d_before[k]) for k, v in critic.state_dict().items())
    assert generator.training and critic.training
    assert all(p.requires_grad for p in list(generator.parameters()) + list(critic.parameters()))
    # Resumes to more steps.
    assert train_izif_encoder(encoder, generator, critic, images, 102, batch_size=16, state=state).step == 102


def test_train_wgan_gp_runs_resumes_and_updates_both_networks():
    generator, critic, _ = _nets(3)
    d_before = [p.detach().clone() for p in critic.parameters()]
    g_before = [p.detach().clone() for p in generator.parameters()]
    images = _waves(24, 6)
    seen, saved = [], []
    state = train_wgan_gp(generator, critic, images, 3, batch_size=8, n_critic=2, seed=0,
                          on_step=lambda step, loss: seen.append((step, loss)),
                          on_checkpoint=lambda s: saved.append(s.step), checkpoint_every=2)
    assert state.step == 3 and state.counters.get("skipped", 0) == 0
    assert [s for s, _ in seen] == [1, 2, 3] and all(math.isfinite(loss) for _, loss in seen)
    assert saved == [2, 3]
    assert state.optimizers["critic"]["state"][0]["step"].item() == 3 * 2
    assert state.optimizers["generator"]["state"][0]["step"].item() == 3
    assert any(not torch.equal(p, q) for p, q in zip(critic.parameters(), d_before))
    assert any(not torch.equal(p, q) for p, q in zip(generator.parameters(), g_before))
    assert all(p.requires_grad for p in critic.parameters())

    state = train_wgan_gp(generator, critic, images, 4, batch_size=8, n_critic=2, state=state)
    assert state.step == 4 and state.optimizers["critic"]["state"][0]["step"].item() == 4 * 2
    # A fresh TrainState holding just the step and both optimiser states (what a checkpoint stores) resumes too.
    plain = TrainState(step=state.step, optimizers=dict(state.optimizers))
    state = train_wgan_gp(generator, critic, images, 5, batch_size=8, n_critic=2, state=plain)
    assert state.step == 5 and state.optimizers["generator"]["state"][0]["step"].item() == 5
    # Nothing left to do: no step taken.
    seen.clear()
    state = train_wgan_gp(generator, critic, images, 5, batch_size=8, n_critic=2, state=state,
                          on_step=lambda step, loss: seen.append(step))
    assert state.step == 5 and seen == [] and state.optimizers["critic"]["state"][0]["step"].item() == 5 * 2


def test_fanogan_container_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(4)
    model = FAnoGAN(in_channels=1, image_size=SIZE, latent_dim=LATENT, width=WIDTH, kappa=2.0)
    x = _waves(5, 7)
    score = model.score(x, batch_size=2)
    assert score.shape == (5,)
    np.testing.assert_allclose(model.score(x).numpy(), score.numpy(), rtol=1e-6)   # batching changes nothing
    assert model.score(x[:0]).shape == (0,)
    model.eval()
    residual_image, residual_features = model.residuals(x)
    assert residual_image.shape == residual_features.shape == (5,) and residual_image.requires_grad
    np.testing.assert_allclose((residual_image + 2.0 * residual_features).detach().numpy(), score.numpy(), rtol=1e-6)
    np.testing.assert_allclose(model.score(x, kappa=0.5).numpy(),
                               (residual_image + 0.5 * residual_features).detach().numpy(), rtol=1e-6)
    assert model.residual_map(x).shape == x.shape and model.residual_map(x[:0]).shape == (0, *x.shape[1:])
    np.testing.assert_allclose(model.residual_map(x, batch_size=2).numpy(), model.residual_map(x).numpy(),
                               rtol=1e-5, atol=1e-7)
    save_file(model.state_dict(), str(tmp_path / "fanogan.safetensors"))
    torch.manual_seed(5)
    loaded = FAnoGAN(in_channels=1, image_size=SIZE, latent_dim=LATENT, width=WIDTH, kappa=2.0)
    loaded.load_state_dict(load_file(str(tmp_path / "fanogan.safetensors")))
    np.testing.assert_allclose(loaded.score(x).numpy(), score.numpy(), rtol=1e-6)
