"""The model-bias variants of supplement S2: LocalPatchGlow (S2.1) and FullyConnectedGlow (S2.2)."""

import math

import numpy as np
import pytest
import torch

from neuro_ood.backbones.glow import ActNorm, Glow, GlowOutput
from neuro_ood.backbones.glow_variants import (DenseFlowStep, FixedOrthogonalProjection,
                                               FullyConnectedGlow, LocalPatchGlow, build_glow_variant)
from neuro_ood.features import glow_log_likelihoods
from tests.test_glow import _perturb_zero_layers
from tests.test_glow_training import train_glow


def _local(dtype=torch.float64, patch=4, learned_prior=False) -> LocalPatchGlow:
    torch.manual_seed(0)
    model = LocalPatchGlow(in_channels=1, patch=patch, steps=2, hidden=8, learned_prior=learned_prior).to(dtype)
    _perturb_zero_layers(model)
    return model


def _fc(dtype=torch.float64, size=(4, 4), n_scales=2, in_channels=1, learned_prior=False) -> FullyConnectedGlow:
    torch.manual_seed(0)
    model = FullyConnectedGlow(in_channels, image_size=size, n_scales=n_scales, steps_per_scale=2, hidden=8,
                               learned_prior=learned_prior).to(dtype)
    _perturb_zero_layers(model)
    return model


def _log_abs_det_jacobian(model, x: torch.Tensor) -> float:
    def to_latents(flat):
        return torch.cat([z.flatten() for z in model(flat.view_as(x)).latents])

    jac = torch.autograd.functional.jacobian(to_latents, x.flatten())
    return torch.linalg.slogdet(jac.reshape(x.numel(), -1))[1].item()


def _waves(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` smooth plane waves in [0.15, 0.85]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    angle = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    return 0.5 + 0.35 * torch.sin(0.6 * (torch.cos(angle) * xx + torch.sin(angle) * yy) + phase)


# ---- LocalPatchGlow -------------------------------------------------------------------------------

@pytest.mark.parametrize("learned_prior", [False, True])
def test_local_patch_glow_inverts_its_forward(learned_prior):
    model = _local(torch.float32, patch=4, learned_prior=learned_prior)
    x = torch.rand(3, 1, 8, 12) - 0.5
    with torch.no_grad():
        model(x)
        out = model(x)
        assert [tuple(z.shape) for z in out.latents] == [(3, 4, 4, 6)]
        assert model.latent_shapes(8, 12) == [(4, 4, 6)]
        assert out.log_prior.shape == out.logdet.shape == out.log_likelihood.shape == (3, 1)
        assert torch.allclose(model.inverse(out.latents), x, atol=1e-4)


def test_local_patch_glow_logdet_equals_log_abs_det_of_the_jacobian():
    model = _local(torch.float64, patch=4)
    x = torch.rand(1, 1, 4, 8, dtype=torch.float64) - 0.5
    model(torch.rand(6, 1, 4, 8, dtype=torch.float64) - 0.5)          # ActNorm init on a batch
    out = model(x)
    assert out.logdet.sum().item() == pytest.approx(_log_abs_det_jacobian(model, x), abs=1e-6)


def test_local_patch_glow_is_the_sum_of_its_single_scale_glow_over_patches():
    model = _local(torch.float64, patch=4, learned_prior=True)
    assert isinstance(model.glow, Glow) and model.glow.n_scales == 1 and model.n_scales == 1
    x = torch.rand(2, 1, 8, 12, dtype=torch.float64) - 0.5
    model(x)
    out = model(x)
    for b in range(2):
        patches = torch.stack([x[b, :, i:i + 4, j:j + 4] for i in range(0, 8, 4) for j in range(0, 12, 4)])
        single = model.glow(patches)
        assert single.log_likelihood.shape == (6, 1)
        assert out.log_likelihood[b, 0].item() == pytest.approx(single.log_likelihood.sum().item(), abs=1e-9)
        assert out.log_prior[b, 0].item() == pytest.approx(single.log_prior.sum().item(), abs=1e-9)
        assert out.logdet[b, 0].item() == pytest.approx(single.logdet.sum().item(), abs=1e-9)
        assert out.log_px[b].item() == pytest.approx(single.log_px.sum().item(), abs=1e-9)
        # Each patch's latent sits at the patch's place in the (4C, H/2, W/2) latent.
        k = 0
        for i in range(0, 4, 2):
            for j in range(0, 6, 2):
                assert torch.equal(out.latents[0][b, :, i:i + 2, j:j + 2], single.latents[0][k])
                k += 1


def test_local_patch_glow_refuses_sizes_and_patches_it_cannot_tile():
    model = LocalPatchGlow(in_channels=1, patch=8, steps=1, hidden=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.zeros(1, 1, 12, 16))
    assert model.padded_size(12, 17) == (16, 24)
    with pytest.raises(ValueError, match="even"):
        LocalPatchGlow(in_channels=1, patch=5)


def test_local_patch_glow_samples_tile_patches():
    model = _local(torch.float32, patch=4)
    model(torch.rand(4, 1, 8, 8) - 0.5)
    assert model.sample(2, 0.7, size=(8, 12)).shape == (2, 1, 8, 12)


# ---- FullyConnectedGlow ---------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels,size,n_scales,learned_prior", [
    (1, (8, 8), 2, False),
    (2, (8, 16), 3, True),
])
def test_fully_connected_glow_inverts_its_forward(in_channels, size, n_scales, learned_prior):
    model = _fc(torch.float32, size=size, n_scales=n_scales, in_channels=in_channels, learned_prior=learned_prior)
    x = torch.rand(5, in_channels, *size) - 0.5
    with torch.no_grad():
        model(x)
        out = model(x)
        assert [tuple(z.shape[1:]) for z in out.latents] == model.latent_shapes(*size)
        assert out.log_likelihood.shape == (5, n_scales)
        assert torch.allclose(model.inverse(out.latents), x, atol=1e-4)


def test_fully_connected_glow_logdet_equals_log_abs_det_of_the_jacobian():
    model = _fc(torch.float64, size=(4, 4), n_scales=2)
    model(torch.rand(8, 1, 4, 4, dtype=torch.float64) - 0.5)          # per-feature ActNorm init on a batch
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64) - 0.5
    out = model(x)
    assert out.logdet.shape == (1, 2)
    assert out.logdet.sum().item() == pytest.approx(_log_abs_det_jacobian(model, x), abs=1e-6)


def test_fully_connected_glow_layers_are_sized_per_scale():
    torch.manual_seed(0)
    model = FullyConnectedGlow(3, image_size=(8, 8), n_scales=3, steps_per_scale=1, hidden=4)
    steps = [scale[0] for scale in model.scales]
    assert all(isinstance(s, DenseFlowStep) for s in steps)
    # D_i = C·H·W / 2^i: (12, 4, 4), (24, 2, 2), (48, 1, 1).
    assert [s.shape for s in steps] == [(12, 4, 4), (24, 2, 2), (48, 1, 1)]
    assert [s.layers[1].weight.shape for s in steps] == [(192, 192), (96, 96), (48, 48)]
    assert [s.layers[2].net[0].in_features for s in steps] == [96, 48, 24]
    assert [s.layers[2].net[-1].out_features for s in steps] == [192, 96, 48]
    with pytest.raises(ValueError, match="built for 8×8"):
        model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8"):
        FullyConnectedGlow(3, image_size=(12, 8), n_scales=3)


def test_fully_connected_projection_is_a_fixed_orthogonal_buffer():
    torch.manual_seed(0)
    layer = FixedOrthogonalProjection(16)
    assert list(layer.parameters()) == []
    assert set(dict(layer.named_buffers())) == {"weight", "log_abs_det"}
    w = layer.weight.double()
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert layer.log_abs_det.item() == pytest.approx(torch.linalg.slogdet(w)[1].item(), abs=1e-7)
    assert abs(layer.log_abs_det.item()) < 1e-4
    model = _fc(torch.float32, size=(8, 8), n_scales=2)
    projections = [m for m in model.modules() if isinstance(m, FixedOrthogonalProjection)]
    assert len(projections) == 4                                      # 2 scales × 2 steps
    trainable = {id(p) for p in model.parameters()}
    assert all(id(m.weight) not in trainable and not m.weight.requires_grad for m in projections)
    assert not any(".layers.1." in n for n, _ in model.named_parameters())
    assert sum(n.endswith(".layers.1.weight") for n in model.state_dict()) == 4   # saved with the model


# ---- factory and training -------------------------------------------------------------------------

def test_build_glow_variant():
    kw = dict(in_channels=1, image_size=(8, 8), n_scales=2, steps_per_scale=1, hidden=4, lu=True,
              learned_prior=False)
    assert type(build_glow_variant("multiscale", **kw)) is Glow
    local = build_glow_variant("local", **kw, patch=4)
    assert isinstance(local, LocalPatchGlow) and local.patch == 4 and len(local.glow.scales[0]) == 1
    fc = build_glow_variant("fc", **kw)
    assert isinstance(fc, FullyConnectedGlow) and fc.image_size == (8, 8) and fc.n_scales == 2
    with pytest.raises(ValueError, match="unknown Glow variant 'conv'.*'multiscale', 'local', 'fc'"):
        build_glow_variant("conv", **kw)
    with pytest.raises(ValueError, match="image_size"):
        build_glow_variant("fc", **{**kw, "image_size": None})


@pytest.mark.parametrize("variant", ["local", "fc"])
def test_variants_train_with_the_glow_step_and_give_per_scale_features(variant):
    torch.manual_seed(0)
    model = build_glow_variant(variant, in_channels=1, image_size=(8, 8), n_scales=2, steps_per_scale=2,
                               hidden=16, lu=True, learned_prior=False, patch=4)
    fixed = {n: b.clone() for n, b in model.named_buffers() if n.endswith("layers.1.weight")}
    assert (len(fixed) > 0) == (variant == "fc")
    images = _waves(24, 8)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    losses = []
    state = train_glow(model, images, 5, batch_size=8, lr=1e-3, on_step=lambda s, l: losses.append(l))
    assert state.step == 5 and state.counters.get("skipped", 0) == 0
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(before, torch.nn.utils.parameters_to_vector(model.parameters()))
    for name, buffer in model.named_buffers():
        if name in fixed:
            assert torch.equal(buffer, fixed[name])                    # the projections stay fixed
    feats = glow_log_likelihoods(model, images[:5], batch_size=2)
    assert feats.shape == (5, model.n_scales) == (5, 1 if variant == "local" else 2)
    assert feats.dtype == np.float64 and np.isfinite(feats).all()
    with torch.no_grad():
        out = model(images[:2] - 0.5)
    assert isinstance(out, GlowOutput) and out.log_px.shape == (2,)
