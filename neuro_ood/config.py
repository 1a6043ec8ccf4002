"""Experiment configuration: typed sections read from YAML, with ``key=value`` overrides.

A config file mirrors :class:`ExperimentConfig`; unknown keys are refused so that a typo never
silently falls back to a default. Overrides use dotted keys (``training.steps=200``) and YAML
values (``model.channels=[16,32,64]``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from neuro_ood.errors import ConfigError


@dataclass
class DataConfig:
    """How a cohort is read and split.

    ``age_column``: candidate column names, the first present is used. ``age_unit``: ``auto``
    (the JSON sidecar's ``Units``, else months for ABCD's ``interview_age``, else years), or one
    of years/months/weeks/days. ``inlier_ages``: inclusive range in years of the normative group.
    """

    age_column: list[str] = field(default_factory=lambda: ["age", "interview_age"])
    age_unit: str = "auto"
    inlier_ages: list[float] = field(default_factory=lambda: [9.0, 11.0])
    heldout_fraction: float = 0.2
    split_seed: int = 0


@dataclass
class PreprocessingConfig:
    """T1 (ABCD/EBDS) or BRATS preprocessing; every field enters the preprocessing fingerprint.

    ``spacing_mm``: common voxel size after reorientation to RAS. ``slice_offsets``: axial slices
    taken at these offsets (voxels at ``spacing_mm``) from the centre of the brain's axial extent.
    ``slice_fit``: ``pad`` centres the brain in a ``slice_size`` field of view at ``spacing_mm``
    (keeps head size, an age cue); ``resize`` interpolates the cropped brain to ``slice_size``.
    BraTS: ``modalities`` stacked as channels; a slice with no tumour voxel is an inlier, one with at
    least ``min_tumour_voxels`` is evaluated as ``tumour``, one with fewer (but some) is left out.
    T1 across sites: ``registration: mni152`` registers each scan affinely to nilearn's MNI152
    template and applies the template's brain mask (whole-head and skull-stripped files alike);
    a registration whose quality is below ``min_registration_quality`` fails that scan;
    ``standardise: white_matter`` (needs registration) scales intensities by the white-matter
    median instead of the ``intensity_percentiles``.
    Whole volumes (``preset: t1_volume``, 3-D MSMA): the same chain up to the [0, 1] scaling, then the
    brain centred in a ``volume_size`` box (voxels at ``spacing_mm``, RAS) by padding/cropping; the
    slice options do not apply.
    """

    preset: str = "t1"
    spacing_mm: list[float] = field(default_factory=lambda: [2.0, 2.0, 2.0])
    n4: bool = False
    n4_shrink: int = 2
    n4_iterations: list[int] = field(default_factory=lambda: [50, 50, 30])
    foreground_fraction: float = 0.1
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    slice_offsets: list[int] = field(default_factory=lambda: [-2, 0, 2])
    slice_size: list[int] = field(default_factory=lambda: [90, 110])
    slice_fit: str = "pad"
    modalities: list[str] = field(default_factory=lambda: ["t1", "t1ce", "t2", "flair"])
    min_tumour_voxels: int = 10
    min_brain_fraction: float = 0.05
    registration: str = "none"
    min_registration_quality: float = 0.35
    standardise: str = "percentile"
    volume_size: list[int] = field(default_factory=lambda: [80, 104, 88])


@dataclass
class ModelConfig:
    """The backbone of a method.

    MSMA: a noise-conditional score network (``backbone`` unet | cond_unet | diffusion_unet, ``channels``,
    ``strides``, ``num_res_units``) and its noise schedule (L geometric sigmas).
    Glow: ``n_scales`` × ``steps_per_scale`` flow steps with coupling width ``hidden``; ``lu``
    (LU-decomposed 1×1 convolutions), ``learned_prior`` (conditional prior instead of independent
    standard normals), ``general_run`` (a Glow run on a general domain, for the likelihood ratio),
    ``variant`` (``multiscale``; S2's ``local`` ``patch``×``patch`` Glow or fully-connected ``fc`` Glow).
    """

    backbone: str = "unet"
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    sigma_max: float = 1.0
    sigma_min: float = 0.01
    num_sigmas: int = 10
    n_scales: int = 3
    steps_per_scale: int = 32
    hidden: int = 512
    lu: bool = True
    learned_prior: bool = False
    general_run: str | None = None
    variant: str = "multiscale"
    patch: int = 8


@dataclass
class TrainingConfig:
    """Optimisation. MSMA: Adam at ``lr``. Glow: Adamax at ``lr`` with ``weight_decay``, linear
    warm-up over ``warmup_steps``, ``augment`` (translate, flip) by up to ``max_shift`` pixels;
    ``init_from`` fine-tunes from another run's weights; with general-domain outliers, the outlier
    loss ``outlier_loss`` (``ratio``: Eq. S1 with ``outlier_temperature`` T and ``outlier_weight`` λ;
    ``margin``: Outlier Exposure's margin loss with ``margin`` nats per dimension). Every method:
    ``warmup_steps`` of linear learning-rate warm-up, ``grad_clip`` (max gradient norm, none by
    default), ``ema_decay`` (an EMA of the weights, scored with instead of the raw weights, as in
    the score-SDE recipe; none by default). MSMA: ``precision`` of the training forward pass
    (``fp32``; ``bf16``: autocast to bfloat16, for GPUs with bfloat16 units — no loss scaling needed;
    the loss and the optimiser stay float32)."""

    steps: int = 200_000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 2019
    checkpoint_every: int = 1000
    device: str = "auto"
    feature_batch_size: int = 64
    weight_decay: float = 0.0
    warmup_steps: int = 0
    augment: list[str] = field(default_factory=list)
    max_shift: int = 2
    init_from: str | None = None
    outlier_loss: str = "ratio"
    outlier_temperature: float = 1000.0
    outlier_weight: float = 6000.0
    margin: float = 1.0
    grad_clip: float | None = None
    ema_decay: float | None = None
    precision: str = "fp32"


@dataclass
class ImagesConfig:
    """Natural-image benchmarks: images converted to ``channels`` and ``size`` (by ``fit``: resize |
    pad); ``n_train`` / ``n_test`` cap the images used per set (None: all)."""

    channels: int | None = None
    size: list[int] = field(default_factory=lambda: [32, 32])
    fit: str = "resize"
    n_train: int | None = None
    n_test: int | None = None


@dataclass
class ScoreConfig:
    """``primary``: scorer whose flag is the scan's flag; ``tpr``: inlier rate kept unflagged.
    ``batch_slices``: slices handed to the detector per call when a pipeline scores items (the
    network then runs ``training.feature_batch_size`` inputs per pass). MSMA only: ``precision``
    of the network's forward pass (``fp32``; ``bf16`` autocast, score norms within about 1% of
    fp32, fast on CPUs and GPUs with bfloat16 units only), ``channels_last`` memory layout and
    ``compile`` (``torch.compile``: the first batch of each shape compiles, 10-40 s on 2 CPU
    cores, then the network runs 1.8-2x faster there; for cohorts, not single scans; scores
    within 1e-4 of eager's); the features the scorers are fitted on are computed the same way, at
    training."""

    primary: str = "gmm"
    tpr: float = 0.95
    batch_slices: int = 64
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False


@dataclass
class ResNetConfig:
    """Classifier baseline (Hendrycks & Gimpel): MONAI ResNet of ``depth`` (10/18/34/50), width ×
    ``widen``, a dense head of ``head_hidden`` units; trained on inliers against ``outlier_group``
    (an age group, the paper's 1-year-olds), whose subjects are split like the inliers'."""

    depth: int = 50
    widen: float = 1.0
    head_hidden: int = 1024
    outlier_group: str = "1"


@dataclass
class FAnoGANConfig:
    """f-AnoGAN baseline (Schlegl et al. 2019): WGAN-GP (``n_critic`` critic steps per generator step,
    gradient penalty ``gp_weight``) then the izif encoder for ``encoder_steps`` steps; anomaly score =
    image residual + ``kappa`` · critic-feature residual. ``betas``: Adam's (β1, β2), (0, 0.9) as in
    the original code (``wgangp_64x64.py``, with lr 1e-4 in ``training.lr``)."""

    latent_dim: int = 128
    width: int = 64
    n_critic: int = 5
    gp_weight: float = 10.0
    kappa: float = 1.0
    encoder_steps: int = 10_000
    betas: list[float] = field(default_factory=lambda: [0.0, 0.9])


@dataclass
class MSMAConfig:
    """What MSMA takes from each slice's scores σ_i s_θ(x, σ_i), i = 1…L (``features``, concatenated
    in this order into the vector the auxiliary scorers see):

    - ``norms``: ‖σ_i s_θ(x, σ_i)‖₂ over the image, the paper's L-vector (its only feature);
    - ``band_means``: per level, the signed mean of σ_i s_θ over the voxels whose intensity lies in
      each of ``bands`` equal-width intensity bands of ``band_range`` (tissue classes, roughly: which
      way, and how far, the model would move each tissue's intensity) — L × bands values;
    - ``band_rms``: the root-mean-square of σ_i s_θ over the same bands — L × bands values.

    ``paper_scores``: with features other than ``[norms]``, also fit the scorers on the L norms
    alone and report them as ``paper_<scorer>`` (``paper_gmm``, …), the paper's own numbers from the
    same network.

    Voxel maps (``voxel_model``): ``norm`` maps the per-voxel score norm (the 2-D default);
    ``gmm`` fits a Gaussian mixture of ``voxel_components`` on local score features (per level, the
    log RMS of σ_i s_θ over a ``voxel_patch``³ neighbourhood) of ``voxel_samples`` foreground voxels
    (3-voxel mean intensity > ``foreground``) from each of the first ``voxel_images`` training images, and maps
    each voxel's surprise −log p above the inlier voxels' median, in nats; it also gives the scan
    score ``voxel_tail`` (minus the mean of the map's top ``tail_fraction`` of foreground voxels).
    ``normative`` (whole volumes in a common box or template space) fits, at every voxel of the
    first ``voxel_images`` training images, the inliers' mean and spread of the per-voxel features
    ``voxel_features`` — ``image`` (the intensities) and ``residual`` (the Tweedie denoising
    residual x + σz + σ²s_θ(x + σz, σ) − x at the levels ``voxel_levels``, indices into the L levels,
    averaged over ``voxel_draws`` seeded noise draws) — and maps the root-mean-square standard
    score over the features (``voxel_scale_floor`` is added to each spread) against the
    best-matching inlier norm within ``voxel_search`` voxels (Euclidean; tolerates residual
    misalignment, 0 = the same voxel only), Gaussian-smoothed over ``voxel_smooth`` voxels (SD);
    ``voxel_tail`` as for ``gmm``.
    """

    features: list[str] = field(default_factory=lambda: ["norms"])
    bands: int = 8
    band_range: list[float] = field(default_factory=lambda: [0.1, 1.0])
    paper_scores: bool = True
    voxel_model: str = "norm"
    voxel_components: int = 8
    voxel_patch: int = 3
    voxel_images: int = 48
    voxel_samples: int = 2000
    voxel_features: list[str] = field(default_factory=lambda: ["image", "residual"])
    voxel_levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    voxel_draws: int = 2
    voxel_smooth: float = 1.5
    voxel_scale_floor: float = 0.02
    voxel_search: int = 0
    foreground: float = 0.1
    tail_fraction: float = 0.001


def _default_scorers() -> dict[str, dict[str, Any]]:
    return {"gmm": {}, "maf": {}, "knn": {}}


@dataclass
class ExperimentConfig:
    """``method``: ``msma`` (score network + auxiliary scorers), ``glow`` (per-scale likelihoods), or
    the baselines ``fanogan``, ``resnet`` and ``simple`` (hand-crafted features + auxiliary scorers)."""

    name: str = "msma"
    method: str = "msma"
    dataset: str = "abcd"
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    scorers: dict[str, dict[str, Any]] = field(default_factory=_default_scorers)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    resnet: ResNetConfig = field(default_factory=ResNetConfig)
    fanogan: FAnoGANConfig = field(default_factory=FAnoGANConfig)
    msma: MSMAConfig = field(default_factory=MSMAConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].type
        sub_cls = globals().get(sub) if isinstance(sub, str) else sub
        if dataclasses.is_dataclass(sub_cls):
            kwargs[name] = _build(sub_cls, value, f"{where}{name}.")
        else:
            kwargs[name] = _checked(value, str(sub), f"{where}{name}")
    return cls(**kwargs)


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _scalar(value: Any, kind: str, where: str) -> Any:
    """``value`` as a ``kind`` (int, float, bool, str); YAML reads ``1e-3`` as a string, so numbers in
    strings are accepted for numeric fields."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None and (kind == "float" or number.is_integer()):
            return int(number) if kind == "int" else number
    raise ConfigError(f"{where} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")


def _checked(value: Any, annotation: str, where: str) -> Any:
    """Check (and where harmless coerce) ``value`` against a field annotation such as ``int``,
    ``str | None``, ``list[float]`` or ``dict[str, dict[str, Any]]``."""
    base = annotation.removesuffix(" | None")
    if value is None:
        if base != annotation:
            return None
        raise ConfigError(f"{where} must be given (it is empty)")
    if base in _SCALARS:
        return _scalar(value, base, where)
    if base.startswith("list["):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = base[5:-1]
        return [_scalar(v, inner, f"{where}[{i}]") if inner in _SCALARS else v for i, v in enumerate(value)]
    if base.startswith("dict[") and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


# The valid values of every enum-like field, checked at load (one ConfigError line instead of a
# traceback deep in the code). tests/test_config.py checks these against the code that uses them.
METHODS = ("msma", "glow", "fanogan", "resnet", "simple")
DATASETS = ("abcd", "brats", "natural")
PRESETS = ("t1", "t1_volume", "brats")
SLICE_FITS = ("pad", "resize")
AGE_UNITS = ("auto", "years", "months", "weeks", "days")
# Also accepted, as neuro_ood.data.cohort reads them (case-insensitive): singular and one-letter forms.
_AGE_UNIT_ALIASES = ("year", "y", "month", "m", "week", "w", "day", "d")
MODALITIES = ("t1", "t1ce", "t2", "flair")
BACKBONES = ("unet", "cond_unet", "diffusion_unet")
GLOW_VARIANTS = ("multiscale", "local", "fc")
OUTLIER_LOSSES = ("ratio", "margin")
AUGMENTATIONS = ("translate", "flip")
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
IMAGE_FITS = ("resize", "pad")
REGISTRATIONS = ("none", "mni152")
STANDARDISATIONS = ("percentile", "white_matter")
IMAGE_CHANNELS = (None, 1, 3)
MSMA_FEATURES = ("norms", "band_means", "band_rms")
VOXEL_MODELS = ("norm", "gmm", "normative")
VOXEL_FEATURES = ("image", "residual")
RESNET_DEPTHS = (10, 18, 34, 50)
#: Registry names of neuro_ood.scorers.SCORERS (not imported here: the scorers pull in torch).
SCORER_NAMES = ("gmm", "knn", "maf")
RENAMED_SCORERS = {"flow": "maf", "kdtree": "knn"}


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _one_of(problems: list[str], key: str, value: Any, valid: Sequence[Any], accepted: Sequence[Any] = ()) -> None:
    if value not in valid and value not in accepted:
        problems.append(f"{key} must be one of {', '.join(map(_show, valid))}, got {value!r}")


def _check_choices(cfg: "ExperimentConfig", problems: list[str]) -> None:
    """Enum-like fields: the key, the bad value and the valid values."""
    _one_of(problems, "method", cfg.method, METHODS)
    _one_of(problems, "dataset", cfg.dataset, DATASETS)
    p, m, t, i = cfg.preprocessing, cfg.model, cfg.training, cfg.images
    _one_of(problems, "preprocessing.preset", p.preset, PRESETS)
    _one_of(problems, "preprocessing.slice_fit", p.slice_fit, SLICE_FITS)
    _one_of(problems, "preprocessing.registration", p.registration, REGISTRATIONS)
    _one_of(problems, "preprocessing.standardise", p.standardise, STANDARDISATIONS)
    if p.standardise == "white_matter" and p.registration == "none":
        problems.append("preprocessing.standardise: white_matter needs preprocessing.registration: mni152 "
                        "(the white-matter map is the template's)")
    if p.registration != "none" and (len(set(p.spacing_mm)) != 1 or not float(p.spacing_mm[0]).is_integer()):
        problems.append(f"preprocessing.registration needs an isotropic spacing in whole mm (the template's grid), "
                        f"got spacing_mm {p.spacing_mm}")
    if p.registration != "none" and p.preset not in ("t1", "t1_volume"):
        problems.append(f"preprocessing.registration is for the t1 preset, not {p.preset!r}")
    if cfg.data.age_unit.lower() not in AGE_UNITS + _AGE_UNIT_ALIASES:
        problems.append(f"data.age_unit must be one of {', '.join(AGE_UNITS)}, got {cfg.data.age_unit!r}")
    bad = [v for v in p.modalities if v not in MODALITIES]
    if bad or not p.modalities or len(set(p.modalities)) != len(p.modalities):
        problems.append(f"preprocessing.modalities must be distinct names among {', '.join(MODALITIES)}, "
                        f"got {p.modalities!r}")
    _one_of(problems, "model.backbone", m.backbone, BACKBONES)
    _one_of(problems, "model.variant", m.variant, GLOW_VARIANTS)
    _one_of(problems, "training.outlier_loss", t.outlier_loss, OUTLIER_LOSSES)
    for k, name in enumerate(t.augment):
        _one_of(problems, f"training.augment[{k}]", name, AUGMENTATIONS)
    if not _DEVICE.fullmatch(t.device):
        problems.append(f"training.device must be one of {', '.join(DEVICES)}, got {t.device!r}")
    _one_of(problems, "images.fit", i.fit, IMAGE_FITS)
    _one_of(problems, "images.channels", i.channels, IMAGE_CHANNELS)
    _one_of(problems, "resnet.depth", cfg.resnet.depth, RESNET_DEPTHS)
    for k, name in enumerate(cfg.msma.features):
        _one_of(problems, f"msma.features[{k}]", name, MSMA_FEATURES)
    _one_of(problems, "msma.voxel_model", cfg.msma.voxel_model, VOXEL_MODELS)
    for k, name in enumerate(cfg.msma.voxel_features):
        _one_of(problems, f"msma.voxel_features[{k}]", name, VOXEL_FEATURES)
    if cfg.method in ("msma", "simple") and cfg.score.primary not in cfg.scorers:
        problems.append(f"score.primary must be one of the {cfg.method} scorers ({', '.join(sorted(cfg.scorers))}), "
                        f"got {cfg.score.primary!r}")


def _check_shapes(cfg: "ExperimentConfig", problems: list[str]) -> None:
    """Lists of a fixed length and numbers that would otherwise fail deep in the code."""
    p, m = cfg.preprocessing, cfg.model
    if len(p.spacing_mm) != 3 or min(p.spacing_mm, default=0) <= 0:
        problems.append(f"preprocessing.spacing_mm must be 3 positive sizes in mm, got {p.spacing_mm}")
    if len(p.slice_size) != 2 or min(p.slice_size, default=0) < 1:
        problems.append(f"preprocessing.slice_size must be [H, W] ≥ 1, got {p.slice_size}")
    if len(p.volume_size) != 3 or min(p.volume_size, default=0) < 1:
        problems.append(f"preprocessing.volume_size must be [X, Y, Z] ≥ 1 voxels, got {p.volume_size}")
    low_high = p.intensity_percentiles
    if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1] <= 100:
        problems.append(f"preprocessing.intensity_percentiles must be [low, high] with 0 ≤ low < high ≤ 100, "
                        f"got {low_high}")
    if not p.slice_offsets:
        problems.append("preprocessing.slice_offsets must name at least one slice")
    if len(cfg.images.size) != 2 or min(cfg.images.size, default=0) < 1:
        problems.append(f"images.size must be [H, W] ≥ 1, got {cfg.images.size}")
    if not 0 < m.sigma_min <= m.sigma_max or m.num_sigmas < 1:
        problems.append(f"model needs 0 < sigma_min ≤ sigma_max and num_sigmas ≥ 1, got sigma_min "
                        f"{m.sigma_min}, sigma_max {m.sigma_max}, num_sigmas {m.num_sigmas}")
    if not m.channels or min(m.channels) < 1:
        problems.append(f"model.channels must be positive channel counts, got {m.channels}")
    elif cfg.method == "msma" and m.backbone in ("unet", "cond_unet") and len(m.strides) != len(m.channels) - 1:
        problems.append(f"model.strides must have one stride per level after the first "
                        f"(len(model.channels) - 1 = {len(m.channels) - 1}), got {m.strides}")
    if m.patch < 2 or m.patch % 2:
        problems.append(f"model.patch must be an even number ≥ 2, got {m.patch}")
    msma = cfg.msma
    if not msma.features or len(set(msma.features)) != len(msma.features):
        problems.append(f"msma.features must name each feature once, at least one, got {msma.features}")
    if msma.bands < 1 or len(msma.band_range) != 2 or not msma.band_range[0] < msma.band_range[1]:
        problems.append(f"msma needs bands ≥ 1 and band_range [low, high] with low < high, got bands "
                        f"{msma.bands}, band_range {msma.band_range}")
    if not msma.voxel_features or len(set(msma.voxel_features)) != len(msma.voxel_features):
        problems.append(f"msma.voxel_features must name each feature once, at least one, got {msma.voxel_features}")
    if "residual" in msma.voxel_features and (not msma.voxel_levels or msma.voxel_draws < 1 or any(
            not 0 <= level < m.num_sigmas for level in msma.voxel_levels)):
        problems.append(f"msma.voxel_levels must be indices 0..{m.num_sigmas - 1} of the noise levels (at least one) "
                        f"and voxel_draws ≥ 1, got {msma.voxel_levels}, {msma.voxel_draws}")
    if msma.voxel_smooth < 0 or msma.voxel_scale_floor <= 0 or msma.voxel_search < 0:
        problems.append(f"msma.voxel_smooth and voxel_search must be ≥ 0 voxels and voxel_scale_floor > 0, got "
                        f"{msma.voxel_smooth}, {msma.voxel_search}, {msma.voxel_scale_floor}")
    betas = cfg.fanogan.betas
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        problems.append(f"fanogan.betas must be Adam's [beta1, beta2], each in [0, 1), got {betas}")


def _check_ranges(cfg: "ExperimentConfig") -> None:
    """Values that parse but make no sense are refused before any work starts."""
    problems = []
    _check_choices(cfg, problems)
    _check_shapes(cfg, problems)
    if not 0 < cfg.score.tpr <= 1:
        problems.append(f"score.tpr must be in (0, 1], got {cfg.score.tpr}")
    if cfg.score.batch_slices < 1:
        problems.append(f"score.batch_slices must be at least 1, got {cfg.score.batch_slices}")
    if cfg.training.precision not in ("fp32", "bf16"):
        problems.append(f"training.precision must be one of fp32, bf16, got {cfg.training.precision!r}")
    elif cfg.training.precision != "fp32" and cfg.method != "msma":
        problems.append(f"training.precision: bf16 is for msma runs; {cfg.method} trains in fp32")
    if cfg.score.precision not in ("fp32", "bf16"):
        problems.append(f"score.precision must be one of fp32, bf16, got {cfg.score.precision!r}")
    elif (cfg.score.precision != "fp32" or cfg.score.channels_last or cfg.score.compile) and cfg.method != "msma":
        problems.append(f"score.precision: bf16, score.channels_last and score.compile are for msma runs; "
                        f"{cfg.method} scores stay plain fp32")
    if not 0 < cfg.data.heldout_fraction < 1:
        problems.append(f"data.heldout_fraction must be in (0, 1), got {cfg.data.heldout_fraction}")
    if len(cfg.data.inlier_ages) != 2 or cfg.data.inlier_ages[0] > cfg.data.inlier_ages[1]:
        problems.append(f"data.inlier_ages must be [low, high] in years, got {cfg.data.inlier_ages}")
    if cfg.training.steps < 0 or cfg.training.batch_size < 1 or cfg.training.checkpoint_every < 1:
        problems.append("training.steps must be ≥ 0, training.batch_size and training.checkpoint_every ≥ 1")
    t = cfg.training
    if t.warmup_steps < 0:
        problems.append(f"training.warmup_steps must be ≥ 0, got {t.warmup_steps}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        problems.append(f"training.grad_clip must be a positive gradient norm or null, got {t.grad_clip}")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        problems.append(f"training.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
    for name, params in cfg.scorers.items():
        if not isinstance(params, dict):
            problems.append(f"scorers.{name} must be a mapping of its parameters ({{}} for the defaults), "
                            f"got {params!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"a.b=3"`` -> ``{"a": {"b": 3}}`` with the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err.problem})") from None
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r} has an empty key part")
        nested = {part: nested}
    return nested


def builtin_config_path(name: str) -> Path:
    """Path of a config shipped with the package (``configs/<name>.yaml``)."""
    path = Path(str(resources.files("neuro_ood.configs").joinpath(f"{name}.yaml")))
    if not path.is_file():
        shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"no built-in config {name!r}; shipped: {', '.join(shipped)}")
    return path


def read_config_dict(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        # A bare name such as "msma_quick" picks a shipped config.
        if path.suffix == "" and path.parent == Path("."):
            path = builtin_config_path(path.name)
        else:
            raise ConfigError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a YAML config (or a shipped config by name), apply ``key=value`` overrides."""
    values = dict(base or {})
    if path is not None:
        values = _deep_merge(values, read_config_dict(path))
    for text in overrides:
        values = _deep_merge(values, parse_override(text))
    cfg = config_from_dict(values)
    _check_scorer_names(cfg)
    return cfg


def _check_scorer_names(cfg: ExperimentConfig) -> None:
    """Scorer names of a config being set up (not of a saved run: those are restored by class name,
    and a run from before the ``maf`` / ``knn`` names still loads)."""
    unknown = [name for name in cfg.scorers if name not in SCORER_NAMES]
    if unknown:
        hints = [f"{name!r} is now {RENAMED_SCORERS[name]!r}" for name in unknown if name in RENAMED_SCORERS]
        raise ConfigError(f"unknown scorer(s) {', '.join(f'scorers.{n}' for n in unknown)}; valid: "
                          f"{', '.join(SCORER_NAMES)}" + (f" ({'; '.join(hints)})" if hints else ""))


def config_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, values, "")
    _check_ranges(cfg)
    return cfg
