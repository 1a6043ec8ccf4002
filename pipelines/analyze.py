"""``neuro-ood analyze fourier``: do low-level statistics dominate a Glow's likelihoods? (S3)

Images are mixed in Fourier space (one image's amplitudes, another's phases); the Spearman
correlation of the mixed images' log-likelihoods with those of the amplitude sources and of the
phase sources says which one the likelihood follows (the paper: > 0.8 amplitude, < 0.05 phase).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402

from neuro_ood.analysis.fourier import fourier_likelihood_analysis, mix_amplitude_phase  # noqa: E402
from neuro_ood.data.image_sets import load_dataset  # noqa: E402
from neuro_ood.errors import RunError  # noqa: E402
from neuro_ood.io import atomic_write  # noqa: E402
from neuro_ood.pipelines.rundir import RunDir  # noqa: E402


def fourier(run_dir: str | Path, dataset: str, data_root: str | Path | None = None, n: int = 500,
            seed: int = 0, figure: str | Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run the S3 analysis with the Glow of ``run_dir`` on ``n`` test images of ``dataset``."""
    console = console or Console(stderr=True)
    run = RunDir(run_dir)
    cfg = run.load_config()
    if cfg.method != "glow":
        raise RunError(f"{run.path} is a {cfg.method} run; the Fourier analysis needs a Glow run")
    detector = run.load_detector(cfg)
    images = load_dataset(dataset, data_root, split="test", channels=cfg.images.channels,
                          size=tuple(cfg.images.size), n=n, seed=seed, fit=cfg.images.fit).images
    with console.status(f"scoring {len(images)} originals and their amplitude/phase mixes"):
        result = fourier_likelihood_analysis(images, lambda x: detector.log_likelihoods(x).sum(1), seed=seed)
    summary = {"run": str(run.path), "dataset": dataset, "n": result.n,
               "spearman_amplitude": result.spearman_amplitude, "spearman_phase": result.spearman_phase}
    if figure is not None:
        _draw_examples(images, result, Path(figure))
        summary["figure"] = str(figure)
    return summary


def _draw_examples(images, result, path: Path, rows: int = 4) -> None:
    """Amplitude source | phase source | mix, with their log-likelihoods, for the first ``rows`` pairs."""
    amp, phase = images[result.amp_index[:rows]], images[result.phase_index[:rows]]
    mixed = mix_amplitude_phase(amp, phase)
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for r in range(rows):
        panels = [(amp[r], "amplitude", result.loglik_amplitude[r]), (phase[r], "phase", result.loglik_phase[r]),
                  (mixed[r], "mix", result.loglik_mixed[r])]
        for ax, (image, title, loglik) in zip(axes[r], panels):
            ax.imshow(image.transpose(1, 2, 0).squeeze(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{title}\nlog p = {loglik:.0f}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
