"""Score-norm extraction: all L levels in one batched pass vs one network call per level."""

import torch
from _timing import best_of, report

from neuro_ood.backbones.ncsn import NoiseConditionalScoreNet, geometric_sigmas
from neuro_ood.features import score_norms


@torch.no_grad()
def per_level_loop(model, x, sigmas):
    return torch.stack([(s * model(x, s.repeat(len(x)))).flatten(1).norm(dim=1) for s in sigmas], 1)


def main():
    torch.manual_seed(0)
    model = NoiseConditionalScoreNet(channels=(16, 32, 64, 128)).eval()
    sigmas = geometric_sigmas()
    x = torch.rand(32, 1, 90, 110)
    batched = best_of(lambda: score_norms(model, x, sigmas, batch_size=320))
    loop = best_of(lambda: per_level_loop(model, x, sigmas))
    report("score_norms, 32 slices × 10 levels, one pass", batched, loop, "loop over levels")


if __name__ == "__main__":
    main()
