import math

import pytest
import torch

from neuro_ood.backbones.glow import (ActNorm, AffineCoupling, Glow, InvConv1x1, Squeeze, bits_per_dim)


def _perturb_zero_layers(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Give the zero-initialised convolutions and learned priors small random values."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AffineCoupling):
                m.net[-1].weight.normal_(0, scale)
                m.net[-1].bias.normal_(0, scale)
            if isinstance(m, Glow) and m.learned_prior:
                for conv in m.split_priors:
                    conv.weight.normal_(0, scale)
                    conv.bias.normal_(0, scale)
                m.top_mean.normal_(0, scale)
                m.top_log_scale.normal_(0, scale)


def _tiny(in_channels=1, n_scales=2, dtype=torch.float64, **kwargs) -> Glow:
    torch.manual_seed(0)
    model = Glow(in_channels=in_channels, n_scales=n_scales, steps_per_scale=2, hidden=16, **kwargs).to(dtype)
    _perturb_zero_layers(model)
    return model


def _log_abs_det_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(fn, x)
    return torch.linalg.slogdet(jac.reshape(x.numel(), -1))[1]


@pytest.mark.parametrize("in_channels,size,lu,learned_prior", [
    (1, (8, 16), True, False),
    (3, (8, 8), False, False),
    (1, (16, 8), False, True),
    (3, (8, 16), True, True),
])
def test_glow_inverts_its_forward(in_channels, size, lu, learned_prior):
    model = _tiny(in_channels, n_scales=3, dtype=torch.float32, lu=lu, learned_prior=learned_prior)
    x = torch.rand(3, in_channels, *size) - 0.5
    with torch.no_grad():
        model(x)
        out = model(x)
        assert torch.allclose(model.inverse(out.latents), x, atol=1e-4)


def test_latent_shapes_for_cifar_sized_inputs():
    torch.manual_seed(0)
    model = Glow(in_channels=3, n_scales=3, steps_per_scale=1, hidden=8)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32) - 0.5)
    assert [tuple(z.shape[1:]) for z in out.latents] == [(6, 16, 16), (12, 8, 8), (48, 4, 4)]
    assert model.latent_shapes(32, 32) == [(6, 16, 16), (12, 8, 8), (48, 4, 4)]
    assert [tuple(s[0].layers[0].bias.shape[1:2]) for s in model.scales] == [(12,), (24,), (48,)]
    assert out.log_prior.shape == out.logdet.shape == out.log_likelihood.shape == (2, 3)


def test_sizes_not_divisible_by_the_total_stride_are_refused():
    model = Glow(in_channels=1, n_scales=3, steps_per_scale=1, hidden=8)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 90, 112))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.zeros(1, 3, 16, 16))
    assert Glow.padded_size(90, 110, 3) == (96, 112)
    assert Glow.padded_size(96, 112, 4) == (96, 112)
    assert Glow.padded_size(97, 1, 4) == (112, 16)


@pytest.mark.parametrize("in_channels,lu,learned_prior", [(1, True, False), (2, False, True)])
def test_total_logdet_equals_log_abs_det_of_the_jacobian(in_channels, lu, learned_prior):
    model = _tiny(in_channels, n_scales=2, lu=lu, learned_prior=learned_prior)
    x = torch.rand(1, in_channels, 4, 4, dtype=torch.float64) - 0.5
    model(x)
    out = model(x)

    def to_latents(flat):
        return torch.cat([z.flatten() for z in model(flat.view_as(x)).latents])

    expected = _log_abs_det_jacobian(to_latents, x.flatten())
    assert out.logdet.sum().item() == pytest.approx(expected.item(), abs=1e-6)


@pytest.mark.parametrize("lu", [True, False])
def test_invconv_logdet_and_inverse(lu):
    torch.manual_seed(1)
    layer = InvConv1x1(4, lu=lu).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    y, logdet = layer(x)
    expected = _log_abs_det_jacobian(lambda v: layer(v.view_as(x))[0].flatten(), x.flatten())
    assert logdet.item() == pytest.approx(expected.item(), abs=1e-8)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10)


def test_invconv_starts_as_a_rotation():
    torch.manual_seed(2)
    for lu in (True, False):
        weight, log_det = InvConv1x1(6, lu=lu).double().matrix()
        assert torch.allclose(weight @ weight.T, torch.eye(6, dtype=torch.float64), atol=1e-5)
        assert log_det.item() == pytest.approx(0.0, abs=1e-5)


def test_affine_coupling_logdet_and_inverse():
    torch.manual_seed(3)
    layer = AffineCoupling(4, hidden=8).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y0, logdet0 = layer(x)
    assert torch.allclose(y0[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0, dtype=torch.float64)))
    assert torch.allclose(logdet0, torch.full((2,), 18 * math.log(torch.sigmoid(torch.tensor(2.0)).item()),
                                              dtype=torch.float64))
    _perturb_zero_layers(layer, scale=0.3)
    y, logdet = layer(x)
    assert torch.equal(y[:, :2], x[:, :2])
    expected = _log_abs_det_jacobian(lambda v: layer(v.view_as(x[:1]))[0].flatten(), x[:1].flatten())
    assert logdet[0].item() == pytest.approx(expected.item(), abs=1e-8)
    assert torch.allclose(layer.inverse(y), x, atol=1e-10)


def test_squeeze_is_a_permutation():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3) and torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(y[0, :4, 0, 0], torch.tensor([0.0, 1.0, 6.0, 7.0], dtype=torch.float64))
    assert torch.equal(Squeeze().inverse(y), x)


@pytest.mark.parametrize("learned_prior", [False, True])
def test_per_scale_terms_add_up_to_the_log_likelihood(learned_prior):
    model = _tiny(1, n_scales=3, learned_prior=learned_prior)
    x = torch.rand(4, 1, 16, 8, dtype=torch.float64) - 0.5
    model(x)
    out = model(x)
    assert torch.allclose(out.log_likelihood, out.log_prior + out.logdet)
    assert torch.allclose(out.log_px, out.log_likelihood.sum(1))
    layer_logdet = torch.zeros(4, dtype=torch.float64)
    h = x
    per_scale = []
    for steps in model.scales:
        h = Squeeze()(h)[0]
        scale_logdet = torch.zeros(4, dtype=torch.float64)
        for step in steps:
            for layer in step.layers:
                h, ld = layer(h)
                scale_logdet = scale_logdet + ld
        per_scale.append(scale_logdet)
        layer_logdet = layer_logdet + scale_logdet
        h = h[:, :h.shape[1] // 2]
    assert torch.allclose(out.logdet, torch.stack(per_scale, 1))
    if not learned_prior:
        gauss = sum(-0.5 * (z ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) for z in out.latents)
        assert torch.allclose(out.log_px, gauss + layer_logdet, atol=1e-9)
        assert torch.allclose(out.log_prior[:, 0], -0.5 * (out.latents[0] ** 2).flatten(1).sum(1)
                              - 0.5 * out.latents[0][0].numel() * math.log(2 * math.pi))
    else:
        z0 = out.latents[0]
        h = Squeeze()(x)[0]
        for step in model.scales[0]:
            h = step(h)[0]
        kept = h[:, :2]
        stats = model.split_priors[0](kept)
        normal = torch.distributions.Normal(stats[:, :2], torch.exp(stats[:, 2:]))
        assert torch.allclose(out.log_prior[:, 0], normal.log_prob(z0).flatten(1).sum(1))
        top = torch.distributions.Normal(model.top_mean, torch.exp(model.top_log_scale))
        assert torch.allclose(out.log_prior[:, -1], top.log_prob(out.latents[-1]).flatten(1).sum(1))


def test_actnorm_data_init_and_no_reinit_after_loading():
    torch.manual_seed(4)
    layer = ActNorm(3)
    x = 2.0 + 3.0 * torch.randn(8, 3, 5, 4)
    y, logdet = layer(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(logdet, torch.full((8,), 20 * layer.log_scale.sum().item()))
    assert torch.allclose(layer.inverse(y), x, atol=1e-5)

    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    fresh(torch.randn(8, 3, 5, 4))
    assert torch.equal(fresh.bias, layer.bias) and torch.equal(fresh.log_scale, layer.log_scale)

    model = _tiny(1, n_scales=2, dtype=torch.float32)
    batch = torch.rand(4, 1, 8, 8) - 0.5
    with torch.no_grad():
        reference = model(batch).log_px
        copy = Glow(in_channels=1, n_scales=2, steps_per_scale=2, hidden=16)
        copy.load_state_dict(model.state_dict())
        assert torch.allclose(copy(batch).log_px, reference, atol=1e-4)


def test_sampling_shapes_and_zero_temperature():
    model = _tiny(3, n_scales=2, dtype=torch.float32)
    model(torch.rand(4, 3, 8, 8) - 0.5)
    x = model.sample(5, 0.7, size=(8, 12), generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 3, 8, 12) and torch.isfinite(x).all()
    x0 = model.sample(2, 0.0, size=(8, 8))
    with torch.no_grad():
        assert torch.allclose(torch.cat([z.flatten(1) for z in model(x0).latents], 1), torch.zeros(2, 3 * 64),
                              atol=1e-4)
    learned = _tiny(1, n_scales=2, dtype=torch.float32, learned_prior=True)
    learned(torch.rand(4, 1, 8, 8) - 0.5)
    assert learned.sample(3, 1.0, size=(8, 8)).shape == (3, 1, 8, 8)


def test_a_few_adamax_steps_lower_the_nll():
    torch.manual_seed(5)
    model = Glow(in_channels=1, n_scales=2, steps_per_scale=2, hidden=16)
    base = torch.rand(16, 1, 1, 8) - 0.5
    data = (base.expand(16, 1, 8, 8) + 0.02 * torch.randn(16, 1, 8, 8)).clamp(-0.5, 0.49)
    optimiser = torch.optim.Adamax(model.parameters(), lr=5e-3, weight_decay=5e-5)
    losses = []
    for _ in range(15):
        x = data + torch.rand_like(data) / 256
        loss = -model(x).log_px.mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 10


def test_bits_per_dim_by_hand():
    assert bits_per_dim(torch.tensor(0.0), n_dims=1).item() == pytest.approx(8.0)
    log_px = torch.tensor([2 * math.log(2.0), -6 * math.log(2.0)])
    assert torch.allclose(bits_per_dim(log_px, n_dims=2), torch.tensor([7.0, 11.0]))
    assert bits_per_dim(torch.tensor(0.0), n_dims=4, n_bins=32).item() == pytest.approx(5.0)
    # Uniform density on [-0.5, 0.5)^D: log p = 0, so every 8-bit bin has probability 2^-8.
    assert bits_per_dim(torch.zeros(3), n_dims=3072).tolist() == pytest.approx([8.0] * 3)
