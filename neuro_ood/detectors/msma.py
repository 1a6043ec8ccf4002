"""MSMA (Mahmood, Oliva & Styner, ICLR 2021): a noise-conditional score network, its L score norms
per image, and auxiliary scorers (GMM, MAF, k-NN) fitted on inlier norm vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from neuro_ood.detectors.base import Progress, _no_progress, to_tensor
from neuro_ood.detectors.featured import FeatureScorerDetector
from neuro_ood.features import (features_of_scaled, local_score_features, scaled_scores, score_feature_size,
                                voxel_feature_maps)
from neuro_ood.inference import inference_network
from neuro_ood.io import load_arrays, read_json, save_arrays, write_json
from neuro_ood.localisation import brain_region
from neuro_ood.scorers import GMMScorer, load_scorers, save_scorers
from neuro_ood.scorers.location import LocationGaussian
from neuro_ood.trainer import sample_rows
from neuro_ood.trainer.steps import dsm_step_fn

VOXEL_DIR = "voxel_model"   # the voxel-level density model, beside the detector's scorers
LOCATION_FILES = ("location.safetensors", "location.json")   # a normative voxel model, in VOXEL_DIR


class MSMADetector(FeatureScorerDetector):
    """Features: per slice, those of ``msma.features`` (:func:`~neuro_ood.features.score_features`) —
    by default the paper's ``(L,)`` score norms ‖σ_i s_θ(x, σ_i)‖₂; scores: the auxiliary scorers' on
    them (see :class:`~neuro_ood.detectors.featured.FeatureScorerDetector`). Maps: the per-voxel score
    norm ``sqrt(Σ_i ‖σ_i s_θ(x, σ_i)‖²)`` over channels, or with ``msma.voxel_model: gmm`` the
    surprise of each voxel's local score features under a mixture fitted on inlier voxels, or with
    ``normative`` the standard score of each voxel's intensity and denoising residuals against the
    inliers at the same location (either adds the scan score ``voxel_tail``), see
    :class:`~neuro_ood.config.MSMAConfig`."""

    method = "msma"
    localises = True
    maps_with_scores = True

    def __init__(self, cfg, device=None):
        super().__init__(cfg, device)
        self.voxel_scorer: GMMScorer | None = None
        self.voxel_median = 0.0     # median surprise −log p of the inlier voxels it was fitted on, nats
        self.location_model: LocationGaussian | None = None

    @property
    def map_unit(self) -> str:
        """What a map value measures, by ``msma.voxel_model`` (and ``msma.voxel_search``)."""
        search = self.cfg.msma.voxel_search
        normative = (f"SD from the best-matching inlier norm within {search} voxels" if search
                     else "SD from the inliers at that voxel")
        return {"normative": normative, "gmm": "nats above the inlier median"}.get(
            self.cfg.msma.voxel_model, "score norm over the levels")

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
        return self._pass(x)[0]

    @torch.no_grad()
    def _pass(self, x: np.ndarray, want_local: bool = False, want_norm_map: bool = False):
        """One pass of ``x (B, C, *spatial)`` through the network at all L levels: the rows
        ``(B, F)`` float64; with ``want_local``, the local score features ``(B, L, *spatial)``; with
        ``want_norm_map``, the per-voxel norm of σ_i s_θ over levels and channels ``(B, *spatial)``
        float32 (the map without a voxel model). What is not wanted is None."""
        m = self.cfg.msma
        rows, local, norm_maps = [], [], []
        for batch, scaled in scaled_scores(self.scoring_network, x, self.sigmas,
                                           max(1, self.cfg.training.feature_batch_size)):
            rows.append(features_of_scaled(batch, scaled, self.feature_kinds, m.bands, m.band_range).cpu().double())
            if want_local:
                local.append(local_score_features(scaled, m.voxel_patch).cpu())
            if want_norm_map:
                norm_maps.append(scaled.float().pow(2).sum(dim=(1, 2)).sqrt().cpu())
        spatial = np.shape(x)[2:]
        if not rows:
            size = score_feature_size(self.feature_kinds, len(self.sigmas), int(self.input_shape[0]), m.bands)
            return (np.zeros((0, size)),
                    np.zeros((0, len(self.sigmas), *spatial), np.float32) if want_local else None,
                    np.zeros((0, *spatial), np.float32) if want_norm_map else None)
        return (torch.cat(rows).numpy(), torch.cat(local).numpy() if want_local else None,
                torch.cat(norm_maps).numpy() if want_norm_map else None)

    def _foreground(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> bool ``(B, *spatial)``: the brain region
        (:func:`~neuro_ood.localisation.brain_region` at ``msma.foreground``) of any channel."""
        return np.stack([brain_region(np.asarray(image).max(axis=0), self.cfg.msma.foreground) for image in x]) \
            if len(x) else np.zeros((0, *np.shape(x)[2:]), bool)

    def _surprise(self, local: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """The voxel map from local features ``(B, L, *spatial)``: −log p − the inlier median, at
        least 0, inside ``foreground``; 0 outside. ``(B, *spatial)`` float32, nats."""
        out = np.zeros(foreground.shape, np.float32)
        rows = np.moveaxis(local, 1, -1)[foreground]                  # (V, L)
        if len(rows):
            out[foreground] = np.maximum(-self.voxel_scorer.score_samples(rows) - self.voxel_median, 0.0)
        return out

    def _tail(self, surprise: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """``voxel_tail`` per image: minus the mean of the top ``msma.tail_fraction`` foreground voxels."""
        tails = []
        for heat, inside in zip(surprise, foreground):
            values = np.sort(heat[inside])[::-1]
            k = max(1, int(round(self.cfg.msma.tail_fraction * len(values))))
            tails.append(-float(values[:k].mean()) if len(values) else 0.0)
        return np.array(tails)

    def _voxel_features(self, x: np.ndarray) -> np.ndarray:
        """``x (B, C, *spatial)`` -> the normative model's feature maps ``(B, F, *spatial)``, the
        kinds of ``msma.voxel_features`` in order."""
        m = self.cfg.msma
        return voxel_feature_maps(self.scoring_network, x, self.sigmas[list(m.voxel_levels)], m.voxel_features,
                                  m.voxel_draws, self.cfg.training.seed, self.cfg.training.feature_batch_size)

    def _voxel_kind_sizes(self) -> list[int]:
        """How many of the F voxel feature maps each kind of ``msma.voxel_features`` holds, in order."""
        m, channels = self.cfg.msma, int(self.input_shape[0])
        sizes = {"image": channels, "residual": channels * len(m.voxel_levels)}
        return [sizes[kind] for kind in m.voxel_features]

    def _normative_maps(self, x: np.ndarray, foreground: np.ndarray,
                        parts: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Root-mean-square standard score against the inliers at each location, each voxel feature
        kind of ``msma.voxel_features`` weighing the same however many maps it has, Gaussian-smoothed
        over ``msma.voxel_smooth`` voxels, 0 outside ``foreground``: ``(B, *spatial)`` float32, SDs;
        with ``parts``, also the same map of each kind alone, ``{kind: (B, *spatial)}``, from the
        same network passes."""
        from scipy.ndimage import gaussian_filter

        smooth = self.cfg.msma.voxel_smooth

        def finish(mean_square: np.ndarray) -> np.ndarray:
            return np.stack([np.where(inside, gaussian_filter(h, smooth) if smooth > 0 else h, 0.0)
                             for h, inside in zip(np.sqrt(mean_square), foreground)]).astype(np.float32)

        starts = np.cumsum([0] + self._voxel_kind_sizes())
        groups = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
        mean_squares = self.location_model.mean_squares(self._voxel_features(x), groups)
        per_kind = {kind: mean_squares[:, k] for k, kind in enumerate(self.cfg.msma.voxel_features)}
        heat = finish(np.mean(list(per_kind.values()), axis=0))
        return heat, ({kind: finish(ms) for kind, ms in per_kind.items()} if parts else {})

    def _voxel_map(self, x: np.ndarray, local: np.ndarray | None = None, parts: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The fitted voxel model's map of ``x (B, C, *spatial)`` and the foreground it covers, both
        ``(B, *spatial)``, and with ``parts`` the normative model's map per feature kind (else ``{}``);
        ``local``: the gmm model's local features when already computed."""
        foreground = self._foreground(x)
        if self.location_model is not None:
            heat, kinds = self._normative_maps(x, foreground, parts=parts)
            return heat, foreground, kinds
        if local is None:
            local = self._pass(x, want_local=True)[1]
        return self._surprise(local, foreground), foreground, {}

    @property
    def _has_voxel_model(self) -> bool:
        return self.voxel_scorer is not None or self.location_model is not None

    def _scores_of_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        views = self.feature_views(rows)
        return {name: scorer.score_samples(views[self._view_of(name, views)]) for name, scorer in self.scorers.items()}

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The auxiliary scorers' scores and, with a voxel model, ``voxel_tail`` (higher = more typical)."""
        if not self._has_voxel_model:
            return super().score_samples(x)
        return self.score_and_maps(x)[0]

    def score_and_maps(self, x: np.ndarray, components: bool = False
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """:meth:`score_samples`, :meth:`maps` and, with ``components``, the parts of
        :meth:`maps_with_components`, of ``x (N, C, *spatial)`` from one set of network passes: a
        voxel model's map is computed once, for ``voxel_tail`` and as the map."""
        chunk = max(1, self.cfg.training.feature_batch_size)
        voxel = self._has_voxel_model
        if not len(x):
            names = list(self.scorers) + (["voxel_tail"] if voxel else [])
            return {name: np.zeros(0) for name in names}, np.zeros((0, *np.shape(x)[2:]), np.float32), {}
        rows, tails, heats, parts = [], [], [], {}
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            features, local, norm_map = self._pass(part, want_local=self.voxel_scorer is not None,
                                                   want_norm_map=not voxel)
            rows.append(features)
            if voxel:
                heat, foreground, kinds = self._voxel_map(
                    part, local, parts=components and len(self.cfg.msma.voxel_features) > 1)
                tails.append(self._tail(heat, foreground))
            else:
                heat, kinds = norm_map, {}
            heats.append(heat)
            for kind, kind_heat in kinds.items():
                parts.setdefault(kind, []).append(kind_heat)
        scores = self._scores_of_rows(np.concatenate(rows))
        if voxel:
            scores["voxel_tail"] = np.concatenate(tails)
        return scores, np.concatenate(heats), {kind: np.concatenate(h) for kind, h in parts.items()}

    def fit_voxel_model(self, x: np.ndarray, progress: Progress | None = None) -> None:
        """Fit the voxel model (``msma.voxel_model``) on the first ``msma.voxel_images`` images of
        ``x (N, C, *spatial)``: ``gmm`` on local score features of ``msma.voxel_samples`` foreground
        voxels from each, ``normative`` on every voxel's features at its location."""
        m, progress = self.cfg.msma, progress or _no_progress
        if m.voxel_model == "normative":
            return self._fit_location_model(x[:max(1, m.voxel_images)], progress)
        rng = np.random.default_rng(self.cfg.training.seed)
        images = x[:max(1, m.voxel_images)]
        samples = []
        progress("fit voxel model", 0, len(images) + 1, float("nan"))
        for start in range(len(images)):
            local = self._pass(images[start:start + 1], want_local=True)[1]
            rows = np.moveaxis(local[0], 0, -1)[self._foreground(images[start:start + 1])[0]]
            samples.append(rows[rng.choice(len(rows), min(len(rows), m.voxel_samples), replace=False)])
            progress("fit voxel model", start + 1, len(images) + 1, float("nan"))
        samples = np.concatenate(samples)
        self.voxel_scorer = GMMScorer(n_components=(m.voxel_components,), cv=2, random_state=self.cfg.training.seed)
        self.voxel_scorer.fit(samples)
        self.voxel_median = float(np.median(-self.voxel_scorer.score_samples(samples)))
        self.meta["voxel_median"] = self.voxel_median   # stored in model.json by save()
        progress("fit voxel model", len(images) + 1, len(images) + 1, float("nan"))

    def _fit_location_model(self, images: np.ndarray, progress: Progress) -> None:
        """Per-location mean and spread of the voxel features of ``images (N, C, *spatial)``."""
        self.location_model = LocationGaussian(scale_floor=self.cfg.msma.voxel_scale_floor,
                                               search_radius=self.cfg.msma.voxel_search)
        progress("fit voxel model", 0, len(images), float("nan"))
        for index in range(len(images)):
            self.location_model.partial_fit(self._voxel_features(images[index:index + 1]))
            progress("fit voxel model", index + 1, len(images), float("nan"))

    def _save_extra(self, directory: Path) -> None:
        super()._save_extra(directory)
        if self.voxel_scorer is not None:
            save_scorers(directory / VOXEL_DIR, {"gmm": self.voxel_scorer})
        if self.location_model is not None:
            arrays, meta = self.location_model.get_state()
            save_arrays(directory / VOXEL_DIR / LOCATION_FILES[0], arrays)
            write_json(directory / VOXEL_DIR / LOCATION_FILES[1], meta)

    def _load_extra(self, directory: Path) -> None:
        super()._load_extra(directory)
        voxels = directory / VOXEL_DIR
        if self.cfg.msma.voxel_model == "gmm" and voxels.is_dir():
            self.voxel_scorer = load_scorers(voxels)["gmm"]
            self.voxel_median = float(self.meta.get("voxel_median", 0.0))
        if self.cfg.msma.voxel_model == "normative" and all((voxels / name).is_file() for name in LOCATION_FILES):
            self.location_model = LocationGaussian.from_state(load_arrays(voxels / LOCATION_FILES[0]),
                                                              read_json(voxels / LOCATION_FILES[1]))

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
        # bf16: the forward pass under autocast (same parameters), the loss in float32
        step = dsm_step_fn(inference_network(self.network, t.precision), optimizer, self.sigmas, self._optimize())
        self._run_stage("train NCSN", step, sample_rows({"x": to_tensor(x)}, t.batch_size),
                        {"model": optimizer}, t.steps, checkpoint_dir, progress)
        self.fit_scorers(self.features(x, progress, "score features (train)"), groups, progress)
        if self.cfg.msma.voxel_model in ("gmm", "normative"):
            self.fit_voxel_model(x, progress)
        return self

    def maps_with_components(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`maps` and, with a ``normative`` voxel model of several ``msma.voxel_features``, the
        map from each feature kind alone, ``{kind: (N, *spatial)}`` — ``image`` is a voxel-wise
        normative model of the intensities without the network, ``residual`` the network's part —
        from one set of network passes; otherwise ``{}``."""
        if self.location_model is None or len(self.cfg.msma.voxel_features) < 2:
            return self.maps(x), {}
        heats, parts = [], {}
        for i in range(len(x)):
            heat, kinds = self._normative_maps(x[i:i + 1], self._foreground(x[i:i + 1]), parts=True)
            heats.append(heat)
            for kind, part in kinds.items():
                parts.setdefault(kind, []).append(part)
        return np.concatenate(heats), {kind: np.concatenate(part) for kind, part in parts.items()}

    def maps(self, x: np.ndarray) -> np.ndarray:
        """``x (N, C, *spatial)`` -> ``(N, *spatial)`` float32, higher = more atypical."""
        if self._has_voxel_model:
            return np.concatenate([self._voxel_map(x[i:i + 1])[0] for i in range(len(x))]) \
                if len(x) else np.zeros((0, *np.shape(x)[2:]), np.float32)
        return self._pass(x, want_norm_map=True)[2]
