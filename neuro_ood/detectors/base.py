"""The detector contract every method follows, and what they share: network, training, state.

A detector is built from its config (:class:`~neuro_ood.config.ExperimentConfig`) and works on
batches of images ``x (N, C, *spatial)`` float32 in [0, 1] — 2-D slices ``(N, C, H, W)`` or 3-D
volumes ``(N, C, D, H, W)`` alike:

- ``fit(x, groups=None, outliers=None, checkpoint_dir=None, resume=True, progress=None)`` trains on
  inliers ``x``; ``groups (N,)`` names the subject of each row (cross-validation folds never split
  a subject); ``outliers`` are images of another group for methods that train on them;
- ``score_samples(x) -> {score name: (N,) float64}``: EVERY SCORE IS HIGHER = MORE TYPICAL
  (more inlier-like), whatever the method computes underneath;
- ``maps(x) -> (N, *spatial) float32`` where the method localises (``localises = True``):
  higher = more atypical at that voxel; ``score_and_maps(x)`` gives both from one pass where
  they share work (a pipeline that wants both calls it);
- ``save(directory)`` / ``load(directory)``: the detector's own state (network weights and
  metadata, training state, fitted scorers) in safe formats; nothing else of a run directory.

A detector prints nothing: progress reaches the caller through ``progress(stage, done, total,
loss)``. ``meta`` holds the caller's metadata stored with the weights (e.g. the preprocessing
fingerprint, checked by the pipelines).

Files a detector writes into its directory::

    model.safetensors   weights it scores with (the EMA weights when training.ema_decay is set)
    model.json          method, architecture sections, input shape, step, caller's meta
    train_state.pt      step, optimiser and EMA states, raw weights under EMA (torch.load(weights_only=True))

A detector without a network (``has_network = False``: the simple baseline) writes ``model.json``
alone of these, with step 0.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from neuro_ood.config import ExperimentConfig, config_from_dict
from neuro_ood.devices import resolve_device
from neuro_ood.errors import RunError
from neuro_ood.inference import inference_network
from neuro_ood.io import atomic_write, read_json, write_json
from neuro_ood.networks import NETWORK_SECTIONS, build_network
from neuro_ood.trainer import TrainState, distributed, ema_model, optimization_manager, train_loop
from neuro_ood.trainer.loop import Sampler, StepFn

#: ``(stage, done, total, loss)``; ``loss`` is NaN for stages without one (feature extraction, fits).
Progress = Callable[[str, int, int, float], None]

WEIGHTS, META, TRAIN_STATE = "model.safetensors", "model.json", "train_state.pt"
#: Config sections stored beside the weights: the architecture plus what scoring reads.
STORED_SECTIONS = (*NETWORK_SECTIONS, "training", "scorers", "msma")


def _no_progress(stage: str, done: int, total: int, loss: float) -> None:
    return None


def read_meta(directory: str | Path) -> dict[str, Any]:
    """``model.json`` of a detector directory, validated; :class:`RunError` if absent or damaged."""
    path = Path(directory) / META
    if not path.is_file():
        raise RunError(f"{Path(directory)}: no {META} (the network's metadata); is this a trained run directory?")
    try:
        meta = read_json(path)
    except ValueError as err:
        raise RunError(f"{path}: not valid JSON ({err}); the run directory is damaged") from None
    missing = {"method", "in_channels", "spatial_dims"} - set(meta if isinstance(meta, dict) else {})
    if missing:
        raise RunError(f"{path}: incomplete network metadata (no {', '.join(sorted(missing))}); "
                       "it was written by another neuro-ood version or damaged — train the run again")
    return meta


def read_train_state(directory: str | Path) -> tuple[TrainState, dict[str, torch.Tensor] | None] | None:
    """The training state in ``directory`` and the raw weights stored under EMA, or None if absent."""
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
        optimizers = saved.get("optimizers")
        if optimizers is None:  # written before the one training loop: a single optimiser state
            optimizers = {"model": saved["optimizer"]} if saved.get("optimizer") is not None else {}
        state = TrainState(step=int(saved["step"]), optimizers=optimizers, ema=saved.get("ema"),
                           counters=dict(saved.get("counters") or {}))
        return state, saved.get("raw_weights")
    except (RuntimeError, EOFError, KeyError, TypeError, AttributeError, pickle.UnpicklingError) as err:
        raise RunError(f"{path}: unreadable training state ({str(err).splitlines()[0]}); "
                       "delete it to restart training from scratch") from None


class Detector:
    """Shared behaviour of the detectors; subclasses implement ``fit`` and ``score_samples``."""

    method: ClassVar[str] = ""
    localises: ClassVar[bool] = False
    #: What a value of :meth:`maps` measures, for figure labels ("" where the method does not localise).
    map_unit: ClassVar[str] = ""
    #: True where :meth:`score_and_maps` costs about what :meth:`score_samples` does (the maps come
    #: out of the scoring passes), so a pipeline may keep every map it might need while scoring.
    maps_with_scores: ClassVar[bool] = False
    needs_outliers: ClassVar[bool] = False
    #: False for a detector with no network to train (the simple baseline): no weights, no training state.
    has_network: ClassVar[bool] = True

    def __init__(self, cfg: ExperimentConfig, device: torch.device | str | None = None):
        self.cfg = cfg
        self.device = distributed.rank_device(torch.device(device) if device is not None
                                              else resolve_device(cfg.training.device))
        self.network: torch.nn.Module | None = None
        self.input_shape: tuple[int, ...] | None = None   # (C, *spatial) the network was built for
        self.train_state: TrainState | None = None
        self.meta: dict[str, Any] = {}
        self.final_loss = float("nan")
        self._raw_weights: dict[str, torch.Tensor] | None = None
        self._ema = None

    # -- the contract -----------------------------------------------------------------------
    @property
    def seen_groups(self) -> tuple[str, ...]:
        """Evaluation groups the detector saw in training (their metrics are not unseen-OOD)."""
        return ()

    def fit(self, x: np.ndarray, *, groups: Sequence[str] | None = None, outliers: np.ndarray | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = True,
            progress: Progress | None = None) -> "Detector":
        raise NotImplementedError

    def score_samples(self, x: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def maps(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.method} detectors do not localise")

    def maps_with_components(self, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """:meth:`maps` and the maps of the parts it combines, ``{part: (N, *spatial)}``, for
        attribution; ``{}`` when the map has no separable parts."""
        return self.maps(x), {}

    def score_and_maps(self, x: np.ndarray, components: bool = False
                       ) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
        """:meth:`score_samples` and :meth:`maps` of ``x (N, C, *spatial)`` together, and with
        ``components`` the parts of :meth:`maps_with_components` (else ``{}``). A detector whose
        scores and maps share work overrides this to do that work once."""
        heat, parts = self.maps_with_components(x) if components else (self.maps(x), {})
        return self.score_samples(x), heat, parts

    def group_view(self, scores: dict[str, np.ndarray], group: str | None) -> dict[str, np.ndarray]:
        """The scores that stand for evaluation ``group`` (``None``: the reference); identity by default."""
        return scores

    # -- state ------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write weights, metadata and (after training) the training state into ``directory``."""
        self._save_network(Path(directory))
        if self.train_state is not None and self.has_network:
            self._save_train_state(Path(directory), self.train_state)
        self._save_extra(Path(directory))

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str | None = None) -> "Detector":
        """A fitted detector from ``directory`` (see :func:`load_detector` for any method)."""
        meta = read_meta(directory)
        if meta["method"] != cls.method:
            raise RunError(f"{directory} holds a {meta['method']} detector, not a {cls.method} one")
        cfg = config_from_dict({"method": meta["method"],
                                **{key: meta[key] for key in STORED_SECTIONS if key in meta}})
        detector = cls(cfg, device)
        detector.meta = dict(meta.get("extra", {}))
        detector._load_network(Path(directory), meta)
        detector._load_extra(Path(directory))
        return detector

    def _save_extra(self, directory: Path) -> None:
        """Subclass state beside the network (fitted scorers)."""

    def _load_extra(self, directory: Path) -> None:
        """Inverse of :meth:`_save_extra`."""

    def _save_network(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.has_network:
            weights = self._ema.module.state_dict() if self._ema is not None else self.network.state_dict()
            state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            with atomic_write(directory / WEIGHTS) as tmp:
                save_file(state, str(tmp))
        sections = self.cfg.to_dict()
        write_json(directory / META, {
            "method": self.method, **{key: sections[key] for key in STORED_SECTIONS},
            "in_channels": self.input_shape[0], "spatial_dims": len(self.input_shape) - 1,
            "image_size": list(self.input_shape[1:]),
            "step": self.train_state.step if self.train_state else 0,
            "ema": self._ema is not None, "extra": self.meta,
            # kept at the top level too: older readers look for it there
            **({"preprocessing_fingerprint": self.meta["preprocessing_fingerprint"]}
               if "preprocessing_fingerprint" in self.meta else {})})

    def _load_network(self, directory: Path, meta: dict[str, Any]) -> None:
        image_size = meta.get("image_size")
        self.input_shape = (int(meta["in_channels"]), *(image_size or []))
        if not self.has_network:
            return
        network = build_network(self.cfg, meta["in_channels"], meta["spatial_dims"], image_size)
        path = directory / WEIGHTS
        if not path.is_file():
            raise RunError(f"{directory}: no {WEIGHTS} (the network's weights); is this a trained run directory?")
        try:
            network.load_state_dict(load_file(str(path)))
        except (RuntimeError, OSError, SafetensorError) as err:
            raise RunError(f"{path}: unreadable or mismatched weights ({str(err).splitlines()[0]})") from None
        self.network = network.to(self.device).eval()

    def _save_train_state(self, directory: Path, state: TrainState) -> None:
        payload = {"step": state.step, "optimizers": state.optimizers, "ema": state.ema,
                   "counters": state.counters}
        if self._ema is not None:
            payload["raw_weights"] = {k: v.detach().cpu() for k, v in self.network.state_dict().items()}
        with atomic_write(directory / TRAIN_STATE) as tmp:
            torch.save(payload, tmp)

    # -- training ---------------------------------------------------------------------------
    def _start_network(self, input_shape: Sequence[int], checkpoint_dir: str | Path | None, resume: bool) -> bool:
        """A new network for inputs ``(C, *spatial)`` (seeded with ``training.seed``), or, with
        ``resume``, the network and training state checkpointed in ``checkpoint_dir``. Returns
        whether training resumed."""
        self.input_shape = tuple(int(s) for s in input_shape)
        saved = read_train_state(checkpoint_dir) if resume and checkpoint_dir is not None else None
        if saved is not None and (Path(checkpoint_dir) / WEIGHTS).is_file():
            self._load_network(Path(checkpoint_dir), read_meta(checkpoint_dir))
            self.train_state, self._raw_weights = saved
            return True
        torch.manual_seed(self.cfg.training.seed)
        self.network = build_network(self.cfg, self.input_shape[0], len(self.input_shape) - 1,
                                     self.input_shape[1:]).to(self.device)
        self.train_state = TrainState()
        return False

    def _start_ema(self) -> None:
        """The EMA of the network when ``training.ema_decay`` is set; on resume the network takes
        back its raw weights (the checkpoint's ``model.safetensors`` holds the EMA ones)."""
        if self._raw_weights is not None:
            self.network.load_state_dict(self._raw_weights)
            self._raw_weights = None
        self._ema = ema_model(self.network, self.cfg.training.ema_decay)

    def training_steps(self) -> int:
        """Optimisation steps of the whole training, over all stages (``training.steps``)."""
        return self.cfg.training.steps

    def _optimize(self):
        return optimization_manager(self.cfg.training.grad_clip)

    def _run_stage(self, stage: str, step_fn: StepFn, sample: Sampler, optimizers: dict, until: int,
                   checkpoint_dir: str | Path | None, progress: Progress | None, start: int = 0,
                   use_ema: bool = True) -> None:
        """Train one stage up to step ``until`` on the one loop, checkpointing into ``checkpoint_dir``;
        ``start`` is the stage's first step (progress counts from there).

        In distributed training (:mod:`neuro_ood.trainer.distributed`) every process starts from
        rank 0's weights, the reported loss is the mean over the processes, rank 0 alone shows
        progress and writes checkpoints, and after the last stage (``until`` reaching
        :meth:`training_steps`) the other processes leave
        (:class:`~neuro_ood.trainer.distributed.WorkerDone`)."""
        t = self.cfg.training
        main = distributed.is_main()
        distributed.check_batch(t.batch_size)
        distributed.broadcast_module(self.network)
        distributed.broadcast_module(self._ema if use_ema else None)
        progress = (progress if main else None) or _no_progress
        total = until - start
        progress(stage, max(0, self.train_state.step - start), total, float("nan"))

        def on_step(step: int, loss: float) -> None:
            loss = distributed.mean_over_ranks(loss)
            self.final_loss = loss
            progress(stage, step - start, total, loss)

        def on_checkpoint(state: TrainState) -> None:
            if checkpoint_dir is not None and main:
                self._save_network(Path(checkpoint_dir))
                self._save_train_state(Path(checkpoint_dir), state)

        ema = self._ema if use_ema else None
        self.train_state = train_loop(step_fn, sample, optimizers, until, seed=t.seed, state=self.train_state,
                                      ema=ema, ema_of=self.network, warmup_steps=t.warmup_steps,
                                      checkpoint_every=t.checkpoint_every, on_step=on_step,
                                      on_checkpoint=on_checkpoint)
        if until >= self.training_steps():
            distributed.leave_unless_main()

    @property
    def scoring_network(self) -> torch.nn.Module:
        """The network scores come from: the EMA weights when training kept an EMA."""
        network = self._ema.module if self._ema is not None else self.network
        network.eval()
        score = self.cfg.score
        if not score.compile:
            return inference_network(network, score.precision, score.channels_last)
        # compiled once per network and weights (not per call); the compiled form holds the weights
        # as constants, so any in-place change to a parameter (training on) asks for a new one
        weights = (id(network), tuple(p._version for p in network.parameters()))
        cached = getattr(self, "_compiled_scoring", None)
        if cached is None or cached[0] != weights:
            self._compiled_scoring = weights, inference_network(network, score.precision, score.channels_last,
                                                                compile=True)
        return self._compiled_scoring[1]


def to_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous float32 CPU tensor (shape unchanged)."""
    return torch.as_tensor(np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float32)
