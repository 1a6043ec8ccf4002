import numpy as np
import pytest
import torch

from neuro_ood.backbones.cond_unet import ConditionalInstanceNorm
from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet, geometric_sigmas
from neuro_ood.features import score_norms
from neuro_ood.losses import dsm_loss
from neuro_ood.trainer import optimization_manager, sample_rows, train_loop
from neuro_ood.trainer.steps import dsm_step_fn


def train_score_network(net, images, sigmas, until, batch_size=16, lr=1e-3, state=None, on_step=None):
    """Adam on the DSM loss on the one loop, as :class:`~neuro_ood.detectors.MSMADetector` trains."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    step = dsm_step_fn(net, optimizer, sigmas, optimization_manager())
    return train_loop(step, sample_rows({"x": images}, batch_size), {"model": optimizer}, until, seed=2019,
                      state=state, on_step=on_step)


def test_geometric_sigmas_match_the_paper():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert sigmas.shape == (10,)
    assert sigmas[0] == pytest.approx(1.0) and sigmas[-1] == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    np.testing.assert_allclose(ratios, ratios[0].item(), rtol=1e-5)


def test_dsm_loss_is_zero_for_the_exact_score_of_a_point_mass():
    # Data = 0 exactly: q_σ(x̃) = N(0, σ²I), whose score is -x̃/σ²; the DSM loss is then 0.
    x = torch.zeros(16, 1, 5, 7)
    loss = dsm_loss(lambda xt, s: -xt / s.view(-1, 1, 1, 1) ** 2, x, geometric_sigmas())
    assert loss.item() == pytest.approx(0.0, abs=1e-8)


def test_dsm_loss_of_a_zero_score_is_half_the_dimension():
    # s = 0: the loss is ½ E‖z‖² = D / 2 for every σ (λ(σ) = σ² makes levels comparable).
    x = torch.rand(4096, 1, 3, 4)
    generator = torch.Generator().manual_seed(0)
    loss = dsm_loss(lambda xt, s: torch.zeros_like(xt), x, geometric_sigmas(), generator=generator)
    assert loss.item() == pytest.approx(12 / 2, rel=0.03)


@pytest.mark.parametrize("backbone,channels", [("unet", (4, 8)), ("cond_unet", (4, 8)), ("diffusion_unet", (8, 8))])
def test_score_network_keeps_odd_shapes_and_depends_on_sigma(backbone, channels):
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(spatial_dims=2, in_channels=2, backbone=backbone, channels=channels,
                                   strides=(2,))
    with torch.no_grad():  # DiffusionModelUNet zero-initialises its output layer
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    x = torch.rand(3, 2, 45, 55)
    low, high = net(x, torch.full((3,), 0.01)), net(x, torch.full((3,), 1.0))
    assert low.shape == x.shape
    assert not torch.allclose(0.01 * low, 1.0 * high)


@pytest.mark.parametrize("backbone", ["unet", "cond_unet"])
def test_score_network_handles_volumes(backbone):
    net = NoiseConditionalScoreNet(spatial_dims=3, in_channels=1, backbone=backbone, channels=(4, 8), strides=(2,))
    assert net(torch.rand(2, 1, 9, 10, 11), torch.tensor([0.1, 0.5])).shape == (2, 1, 9, 10, 11)


def test_cond_unet_conditions_every_normalisation_on_sigma():
    # The plain UNet's instance norms would remove a constant log-σ channel; here every one of
    # them is replaced, and each one's output moves with σ once its FiLM layer has weights.
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(spatial_dims=2, backbone="cond_unet", channels=(4, 8, 16), strides=(2, 2))
    norms = [m for m in net.modules() if isinstance(m, ConditionalInstanceNorm)]
    assert len(norms) == net.net.n_conditioned > 0
    assert not any(isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) for m in net.modules())
    with torch.no_grad():
        for norm in norms:
            norm.film.weight.normal_(0, 0.1)
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: outputs.setdefault(k, []).append(o)) for k, m in enumerate(norms)]
    x = torch.rand(2, 1, 16, 16)
    net(x, torch.full((2,), 0.01))
    net(x, torch.full((2,), 1.0))
    for hook in hooks:
        hook.remove()
    for k, (low, high) in outputs.items():
        assert (low - high).abs().max() > 1e-3, f"normalisation {k} does not depend on sigma"


def test_trained_cond_unet_scores_differ_across_sigma():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 16, 16) * 0.2 + torch.linspace(0, 0.8, 16).view(1, 1, 1, 16)
    net = NoiseConditionalScoreNet(spatial_dims=2, backbone="cond_unet", channels=(8, 16), strides=(2,))
    sigmas = geometric_sigmas()
    train_score_network(net, images, sigmas, until=60, batch_size=16)
    norms = score_norms(net, images[:8], sigmas)           # (8, L) ‖σ s(x, σ)‖
    relative = np.abs(norms[:, 0] - norms[:, -1]) / norms.mean(axis=1)
    assert relative.mean() > 0.1


def test_score_norms_batched_pass_equals_a_loop_over_levels():
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(channels=(4, 8), strides=(2,)).eval()
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    x = torch.rand(5, 1, 12, 14)
    norms, maps = score_norms(net, x, sigmas, batch_size=20, return_maps=True)
    assert norms.shape == (5, 10) and maps.shape == (5, 10, 12, 14)
    with torch.no_grad():
        expected = np.stack([(s * net(x, s.repeat(5))).flatten(1).norm(dim=1).numpy() for s in sigmas], 1)
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    np.testing.assert_allclose(np.sqrt((maps ** 2).sum(axis=(2, 3))), norms, rtol=1e-4)


def test_training_lowers_the_loss_and_resumes():
    torch.manual_seed(0)
    images = torch.rand(32, 1, 8, 8) * 0.1 + torch.linspace(0, 1, 8).view(1, 1, 1, 8)
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    net = NoiseConditionalScoreNet(channels=(8, 16), strides=(2,))
    losses = []
    state = train_score_network(net, images, sigmas, 60, batch_size=16, lr=3e-3,
                                on_step=lambda step, loss: losses.append(loss))
    assert state.step == 60 and np.mean(losses[-10:]) < np.mean(losses[:10])
    assert state.counters.get("skipped", 0) == 0 and state.optimizers["model"]["state"]
    resumed = train_score_network(net, images, sigmas, 70, batch_size=16, state=state,
                                  on_step=lambda step, loss: losses.append(step))
    assert resumed.step == 70 and losses[-10:] == list(range(61, 71))
