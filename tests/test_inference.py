"""Scoring options: bf16 autocast and channels-last keep MSMA's score norms close to fp32, the
default is the plain network, and score items run in inference mode in configurable chunks."""

import numpy as np
import pytest
import torch

from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet
from neuro_ood.config import load_config
from neuro_ood.errors import ConfigError
from neuro_ood.features import score_norms
from neuro_ood.inference import InferenceNetwork, inference_network
from neuro_ood.pipelines.common import score_items
from neuro_ood.pipelines.datasets import Item


@pytest.fixture(scope="module")
def net_and_images():
    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(channels=(8, 16), strides=(2,)).eval()
    return net, torch.rand(6, 1, 44, 56)


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.max(np.abs(approx - exact) / np.abs(exact)))


def test_default_is_the_network_itself(net_and_images):
    net, _ = net_and_images
    assert inference_network(net) is net
    assert isinstance(inference_network(net, "bf16"), InferenceNetwork)


def test_bf16_score_norms_within_two_percent_of_fp32(net_and_images):
    """bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2 % per operation); over a
    few convolutions the per-voxel scores drift by about 1 %, and the norm over all voxels averages
    much of that out. 2 % is the stated bound; it fails if autocast is not applied (0 error is
    checked against too) or if the output is mis-cast."""
    net, x = net_and_images
    exact = score_norms(net, x, net.sigmas, batch_size=20)
    approx = score_norms(inference_network(net, "bf16"), x, net.sigmas, batch_size=20)
    error = _relative_error(approx, exact)
    assert approx.dtype == np.float64 and approx.shape == exact.shape == (6, 10)
    assert 0 < error < 0.02, error


def test_channels_last_gives_the_fp32_norms(net_and_images):
    """The same float32 arithmetic in another memory order: only summation order differs (1e-5)."""
    net, x = net_and_images
    exact = score_norms(net, x, net.sigmas, batch_size=20)
    assert _relative_error(score_norms(inference_network(net, channels_last=True), x, net.sigmas,
                                       batch_size=20), exact) < 1e-4


def test_compiled_network_gives_the_eager_norms(net_and_images):
    """``torch.compile`` (inductor) fuses and reorders float32 arithmetic: 1e-4 relative, as for
    channels-last. Fails if the compiled path drops or changes an operation."""
    net, x = net_and_images
    compiled = inference_network(net, compile=True)
    assert isinstance(compiled, InferenceNetwork) and compiled.network is net
    exact = score_norms(net, x, net.sigmas, batch_size=20)
    assert _relative_error(score_norms(compiled, x, net.sigmas, batch_size=20), exact) < 1e-4
    assert list(compiled.state_dict()) == ["network." + k for k in net.state_dict()]  # no second copy
    both = score_norms(inference_network(net, "bf16", compile=True), x, net.sigmas, batch_size=20)
    assert 0 < _relative_error(both, exact) < 0.02   # compiled under autocast: bf16's bound


class _Recorder:
    """A detector stand-in recording the chunk sizes and the inference mode it was called in."""

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, []

    def score_samples(self, x):
        self.calls.append((len(x), torch.is_inference_mode_enabled()))
        return {"s": x.reshape(len(x), -1).mean(1).astype(np.float64)}

    def score_and_maps(self, x, components=False):
        """The slices' first channel as their maps, with a part twice that when ``components``."""
        return self.score_samples(x), x[:, 0], ({"double": 2 * x[:, 0]} if components else {})


def test_score_items_batches_all_items_in_configured_chunks_in_inference_mode():
    cfg = load_config("msma_quick", ["score.batch_slices=5"])
    items = [Item(key=f"k{i}", subject=f"s{i}", group=None, label=f"l{i}",
                  slices=np.full((3, 1, 2, 2), float(i), np.float32)) for i in range(4)]
    recorder = _Recorder(cfg)
    scores = score_items(recorder, items)
    assert recorder.calls == [(5, True), (5, True), (2, True)]
    np.testing.assert_allclose(scores["s"], [0, 1, 2, 3])


@pytest.mark.parametrize("components", [False, True])
def test_score_items_hands_each_items_maps_over_once_its_slices_are_scored(components):
    """With ``on_maps``, maps come from the scoring calls and reach the callback per item, in order,
    whole even where an item's slices straddle two chunks (3 slices an item, chunks of 5)."""
    cfg = load_config("msma_quick", ["score.batch_slices=5"])
    counts = [3, 1, 3, 3]
    items = [Item(key=f"k{i}", subject=f"s{i}", group=None, label=f"l{i}",
                  slices=np.arange(n * 4, dtype=np.float32).reshape(n, 1, 2, 2) + 100 * i) for i, n in enumerate(counts)]
    recorder, seen = _Recorder(cfg), []
    scores = score_items(recorder, items, on_maps=lambda index, heat, parts: seen.append((index, heat, parts)),
                         components=components)
    assert [size for size, _ in recorder.calls] == [5, 5]
    assert [index for index, _, _ in seen] == [0, 1, 2, 3]
    for (index, heat, parts), item in zip(seen, items):
        np.testing.assert_array_equal(heat, item.slices[:, 0])
        assert set(parts) == ({"double"} if components else set())
        if components:
            np.testing.assert_array_equal(parts["double"], 2 * item.slices[:, 0])
    np.testing.assert_allclose(scores["s"], [item.slices.mean() for item in items])


@pytest.mark.parametrize("override, message", [("score.precision=fp16", "score.precision"),
                                               ("score.batch_slices=0", "score.batch_slices")])
def test_bad_score_options_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("msma_quick", [override])


@pytest.mark.parametrize("override", ["score.precision=bf16", "score.compile=true"])
def test_network_options_are_for_msma_only(override):
    with pytest.raises(ConfigError, match="msma runs"):
        load_config("glow_quick", [override])


def test_a_detector_compiles_its_scoring_network_once():
    """``score.compile``: the compiled wrapper is built once and reused by every scoring call
    (compiling per call would cost the compile time each time); changed weights (frozen into the
    compiled form) or a new network get a new one."""
    from neuro_ood.detectors.msma import MSMADetector

    detector = MSMADetector(load_config("msma_quick", ["model.channels=[8, 16]", "model.strides=[2]",
                                                       "training.device=cpu", "score.compile=true",
                                                       "training.ema_decay=0.99"]))
    detector._start_network((1, 44, 56), None, resume=False)
    first = detector.scoring_network
    assert isinstance(first, InferenceNetwork) and first.network is detector.network
    assert detector.scoring_network is first
    with torch.no_grad():
        next(detector.network.parameters()).add_(1.0)      # weights changed in place (training on)
    second = detector.scoring_network
    assert second is not first and second.network is detector.network
    detector._start_ema()
    assert detector.scoring_network is not second and detector.scoring_network.network is detector._ema.module


def test_an_msma_detector_scores_through_the_configured_precision():
    """The detector's own features (what its scorers are fitted on and score) follow ``score.precision``."""
    from neuro_ood.detectors.msma import MSMADetector

    tiny = ["model.channels=[8, 16]", "model.strides=[2]", "training.device=cpu"]
    x = np.random.default_rng(0).random((4, 1, 44, 56)).astype(np.float32)
    features = {}
    for precision in ("fp32", "bf16"):
        detector = MSMADetector(load_config("msma_quick", [*tiny, f"score.precision={precision}"]))
        detector._start_network(x.shape[1:], None, resume=False)
        detector._start_ema()
        assert isinstance(detector.scoring_network, InferenceNetwork) == (precision == "bf16")
        features[precision] = detector.row_features(x)
    assert 0 < _relative_error(features["bf16"], features["fp32"]) < 0.02


def test_bf16_training_runs_the_forward_under_autocast_and_tracks_fp32():
    """``training.precision: bf16``: the DSM loss of the same batch and noise is within 2% of fp32's,
    the forward pass really runs in bfloat16, and the step updates the network's own weights."""
    from neuro_ood.losses import dsm_loss

    torch.manual_seed(0)
    net = NoiseConditionalScoreNet(channels=(8, 16), strides=(2,))
    x, sigmas = torch.rand(4, 1, 44, 56), torch.tensor([1.0, 0.1, 0.01])
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = {p: dsm_loss(inference_network(net, p), x, sigmas, generator=torch.Generator().manual_seed(1))
              for p in ("fp32", "bf16")}
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16] and losses["bf16"].dtype == torch.float32
    assert abs(losses["bf16"].item() / losses["fp32"].item() - 1) < 0.02
    before = [p.detach().clone() for p in net.parameters()]
    losses["bf16"].backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_bf16_training_is_for_msma_only():
    with pytest.raises(ConfigError, match="training.precision"):
        load_config("glow_quick", ["training.precision=bf16"])
