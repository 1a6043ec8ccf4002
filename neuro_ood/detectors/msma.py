"""MSMA (Mahmood, Oliva & Styner, ICLR 2021): a noise-conditional score network, its L score norms
per image, and auxiliary scorers (GMM, MAF, k-NN) fitted on inlier norm vectors."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from neuro_ood.detectors.base import Progress, to_tensor
from neuro_ood.detectors.featured import FeatureScorerDetector
from neuro_ood.features import score_feature_size, score_features, score_norms
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import dsm_step_fn


class MSMADetector(FeatureScorerDetector):
    """Features: per slice, those of ``msma.features`` (:func:`~neuro_ood.features.score_features`) —
    by default the paper's ``(L,)`` score norms ‖σ_i s_θ(x, σ_i)‖₂; scores: the auxiliary scorers' on
    them (see :class:`~neuro_ood.detectors.featured.FeatureScorerDetector`). Maps: the per-voxel score
    norm ``sqrt(Σ_i ‖σ_i s_θ(x, σ_i)‖²)`` over channels."""

    method = "msma"
    localises = True

    @property
    def sigmas(self) -> torch.Tensor:
        """``(L,)`` noise levels, as stored in the network."""
        return self.network.sigmas.detach().cpu()

    @property
    def feature_kinds(self) -> tuple[str, ...]:
        """The features computed per row: ``msma.features``, then the paper's ``norms`` when
        ``msma.paper_scores`` asks for scores on them and they are not among the configured ones."""
        m = self.cfg.msma
        kinds = tuple(m.features)
        return kinds + ("norms",) if m.paper_scores and "norms" not in kinds else kinds

    def row_features(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> ``(B, F)`` float64: the :attr:`feature_kinds` of each image."""
        m = self.cfg.msma
        return score_features(self.scoring_network, x, self.sigmas, kinds=self.feature_kinds, bands=m.bands,
                              band_range=tuple(m.band_range), batch_size=max(1, self.cfg.training.feature_batch_size))

    def feature_views(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """``""``: the ``msma.features`` columns; with ``msma.paper_scores`` and other features than
        the paper's, also ``"paper_"``: the L score norms alone (scores ``paper_gmm``, …)."""
        m = self.cfg.msma
        kinds = self.feature_kinds
        if tuple(m.features) == ("norms",) or not m.paper_scores:
            return {"": features}
        channels = int(self.input_shape[0])
        sizes = [score_feature_size((kind,), len(self.sigmas), channels, m.bands) for kind in kinds]
        starts = dict(zip(kinds, np.cumsum([0] + sizes[:-1])))
        columns = {kind: np.arange(starts[kind], starts[kind] + size) for kind, size in zip(kinds, sizes)}
        configured = np.concatenate([columns[kind] for kind in m.features])
        return {"": features[:, configured], "paper_": features[:, columns["norms"]]}

    def features(self, x: np.ndarray, progress: Progress | None = None, stage: str = "score features") -> np.ndarray:
        return super().features(x, progress, stage)

    def fit(self, x, *, groups: Sequence[str] | None = None, outliers=None, checkpoint_dir=None, resume=True,
            progress: Progress | None = None) -> "MSMADetector":
        """Train the score network on ``x (N, C, *spatial)`` by DSM (Adam), then fit the scorers on
        the training norms; ``groups (N,)`` keeps a subject's rows in one CV fold of the GMM search."""
        t = self.cfg.training
        self._start_network(x.shape[1:], checkpoint_dir, resume)
        self._start_ema()
        optimizer = torch.optim.Adam(self.network.parameters(), lr=t.lr)
        step = dsm_step_fn(self.network, optimizer, self.sigmas, self._optimize())
        self._run_stage("train NCSN", step, sample_rows({"x": to_tensor(x)}, t.batch_size),
                        {"model": optimizer}, t.steps, checkpoint_dir, progress)
        self.fit_scorers(self.features(x, progress, "score features (train)"), groups, progress)
        return self

    def maps(self, x: np.ndarray) -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, *spatial)`` float32, higher = more atypical."""
        _, per_level = score_norms(self.scoring_network, x, self.sigmas,
                                   batch_size=self.cfg.training.feature_batch_size, return_maps=True)
        return np.sqrt((per_level ** 2).sum(axis=1))
