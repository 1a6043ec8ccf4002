"""``neuro-ood benchmark``: MSMA and Glow side by side on natural-image in/out dataset pairs.

For an in-distribution set and one or more out-of-distribution sets (test splits), the benchmark
trains (or reuses, from ``run_dir``) the methods on the in-distribution training split and reports
every metric per pair and method:

- ``msma_gmm``, ``msma_maf``, ``msma_knn``: MSMA with each auxiliary scorer;
- ``fanogan``: f-AnoGAN's residual score (negated: higher = more typical);
- ``simple_gmm``, ``simple_knn``: the simple baseline (hand-crafted intensity and shape features of
  each image, :mod:`neuro_ood.simple_features`) with each auxiliary scorer;
- ``glow_raw``: the Glow's log-likelihood; ``glow_last_scale``: its coarsest-scale contribution;
- with a general-domain set: ``glow_diff`` (log-likelihood ratio against a Glow trained on the general
  set), ``glow_diff_outlier_loss`` (the same after fine-tuning the in-distribution Glow with the
  outlier loss, general-domain images as outliers) and ``resnet_p_in`` (Glow supplement S9: a
  ResNet trained to tell the in-distribution set from the general set, scored by p(in | x)).

With no data root the built-in offline sets are used (see :data:`DEFAULT_BENCHMARK`).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from neuro_ood.config import ExperimentConfig, ImagesConfig, load_config
from neuro_ood.data.image_readers import DatasetError, ImageSet
from neuro_ood.data.image_sets import load_dataset, split_train_test
from neuro_ood.errors import ConfigError
from neuro_ood.detectors import Detector, GlowDetector, build_detector, detector_class
from neuro_ood.devices import resolve_device
from neuro_ood.features import glow_anomaly_scores
from neuro_ood.io import write_json
from neuro_ood.metrics import ood_metrics
from neuro_ood.preprocessing.presets import preprocessing_fingerprint
from neuro_ood.pipelines.common import ConsoleProgress, batched
from neuro_ood.pipelines.rundir import RunDir

DEFAULT_BENCHMARK = {"in": "china", "out": ["flower", "constant", "digits", "gaussian"], "general": "textures"}
DEFAULT_CONFIGS = {"msma": "msma_bench_quick", "glow": "glow_bench_quick", "fanogan": "fanogan_bench_quick",
                   "resnet": "resnet_bench_quick", "simple": "simple_bench_quick"}


@dataclass
class BenchmarkSets:
    """In-distribution train/test images, out-of-distribution test sets and the general-domain set."""

    in_train: ImageSet
    in_test: ImageSet
    outs: dict[str, ImageSet]
    general: ImageSet | None


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_") or "set"


def _load(spec: str, data_root, split: str, images: ImagesConfig, n: int | None, seed: int) -> ImageSet:
    return load_dataset(spec, data_root, split=split, channels=images.channels,
                        size=tuple(images.size) if images.size else None, n=n, seed=seed, fit=images.fit)


def load_sets(in_spec: str, out_specs: Sequence[str], general_spec: str | None, data_root,
              images: ImagesConfig, console: Console, seed: int = 0) -> BenchmarkSets:
    """Read every set at the configured channels and size; an in-distribution set that ships only
    a test split (e.g. the MNIST test files alone) is split 80/20 into train and test."""
    try:
        in_train = _load(in_spec, data_root, "train", images, images.n_train, seed)
        in_test = _load(in_spec, data_root, "test", images, images.n_test, seed)
    except DatasetError as err:
        whole = _load(in_spec, data_root, "test", images, None, seed)
        console.print(f"[yellow]{escape(f'{in_spec}: no training split ({err.reason})')}; "
                      "using 80/20 of its test split[/]", highlight=False)
        in_train, in_test = split_train_test(whole, test_fraction=0.2, seed=seed)
        if images.n_train:
            in_train = dataclasses.replace(in_train, images=in_train.images[:images.n_train])
        if images.n_test:
            in_test = dataclasses.replace(in_test, images=in_test.images[:images.n_test])
    outs = {spec: _load(spec, data_root, "test", images, images.n_test, seed) for spec in out_specs}
    general = _load(general_spec, data_root, "train", images, images.n_train, seed) if general_spec else None
    return BenchmarkSets(in_train, in_test, outs, general)


def _score_sets(score: Callable[[np.ndarray], dict[str, np.ndarray]], sets: dict[str, np.ndarray],
                console: Console, description: str) -> dict[str, dict]:
    """``{set name: {score name: (N,)}}``, a progress bar per set."""
    return {name: batched(score, images, 256, console, f"{description}: {name}") for name, images in sets.items()}


def _prepare_run(path: Path, cfg: ExperimentConfig, image_set: str) -> RunDir:
    """The run directory of one model, its config recording the image set it trains on in ``name``."""
    run = RunDir(path)
    run.save_config(dataclasses.replace(cfg, dataset="natural", name=f"{cfg.name}[{image_set}]"))
    return run


def _fitted(run: RunDir, cfg: ExperimentConfig, images: np.ndarray, console: Console, steps: int | None = None,
            needs: str = "model.safetensors", general=None, **fit_args) -> Detector:
    """The run's detector if it was already trained for ``steps`` (default ``training.steps``)
    steps and holds ``needs``; else a detector of ``cfg`` trained on ``images`` and saved there."""
    steps = cfg.training.steps if steps is None else steps
    device = resolve_device(cfg.training.device)
    trained = run.file("train_state.pt").is_file() or not detector_class(cfg.method).has_network
    if run.trained_steps() >= steps and run.file(needs).is_file() and trained:
        detector = detector_class(cfg.method).load(run.path, device)
    else:
        detector = GlowDetector(cfg, device, general=general) if cfg.method == "glow" else build_detector(cfg, device)
        detector.meta["preprocessing_fingerprint"] = preprocessing_fingerprint(cfg.preprocessing)
        with ConsoleProgress(console) as progress:
            detector.fit(images, checkpoint_dir=run.path, progress=progress, **fit_args)
        detector.save(run.path)
    return detector


def benchmark(in_spec: str | None = None, out_specs: Sequence[str] = (), data_root: str | Path | None = None,
              model: str = "all", general_spec: str | None = None, configs: Sequence[str] = (),
              run_dir: str | Path = "benchmark", console: Console | None = None,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train or reuse the methods and write ``run_dir/benchmark.json``; see the module docstring."""
    started = time.perf_counter()
    console = console or Console(stderr=True)
    if in_spec is None:
        in_spec, out_specs = DEFAULT_BENCHMARK["in"], out_specs or DEFAULT_BENCHMARK["out"]
        general_spec = general_spec or DEFAULT_BENCHMARK["general"]
    if not out_specs:
        raise ConfigError("give at least one --out dataset")
    if model == "all":
        methods = ["msma", "glow", "fanogan"] + (["resnet"] if general_spec else []) + ["simple"]
    else:
        methods = [model]
    if any(m not in DEFAULT_CONFIGS for m in methods):
        raise ConfigError(f"--model must be msma, glow, fanogan, resnet, simple or all, got {model!r}")
    if "resnet" in methods and not general_spec:
        raise ConfigError("the ResNet classifier (S9) learns the in-distribution set against --general; give one")
    cfgs = {m: load_config(DEFAULT_CONFIGS[m], overrides) for m in methods}
    for path in configs:
        cfg = load_config(path, overrides)
        if cfg.method not in cfgs:
            raise ConfigError(f"config {path} is a {cfg.method} config, but --model is {model}")
        cfgs[cfg.method] = cfg
    images_cfg = next(iter(cfgs.values())).images
    if any((c.images.channels, c.images.size) != (images_cfg.channels, images_cfg.size) for c in cfgs.values()):
        raise ConfigError("the configs disagree on images.channels / images.size; the methods must see the same images")
    sets = load_sets(in_spec, out_specs, general_spec, data_root, images_cfg, console)
    test_sets = {"in": sets.in_test.images, **{name: s.images for name, s in sets.outs.items()}}
    root = Path(run_dir)
    results: dict[str, dict[str, dict[str, float]]] = {f"{in_spec}->{o}": {} for o in out_specs}
    bpd: dict[str, dict[str, float]] = {}

    def add(scores: dict[str, dict[str, np.ndarray]], prefix: str) -> None:
        for out in out_specs:
            for key, inlier_scores in scores["in"].items():
                results[f"{in_spec}->{out}"][f"{prefix}{key}"] = ood_metrics(inlier_scores, scores[out][key])

    if "msma" in cfgs:
        cfg = cfgs["msma"]
        run = _prepare_run(root / _slug(in_spec) / "msma", cfg, in_spec)
        detector = _fitted(run, cfg, sets.in_train.images, console, needs="scorers.json")
        add(_score_sets(detector.score_samples, test_sets, console, "MSMA scores"), "msma_")

    if "glow" in cfgs:
        cfg = cfgs["glow"]

        def loglik_of(detector: GlowDetector, description: str) -> dict[str, np.ndarray]:
            scored = _score_sets(lambda x: {"loglik": detector.log_likelihoods(x)}, test_sets, console, description)
            return {name: values["loglik"] for name, values in scored.items()}

        in_path = root / _slug(in_spec) / "glow"
        glow_in = _fitted(_prepare_run(in_path, cfg, in_spec), cfg, sets.in_train.images, console)
        loglik = loglik_of(glow_in, "Glow likelihoods")
        add({name: glow_anomaly_scores(ll) for name, ll in loglik.items()}, "glow_")
        bpd[f"glow[{in_spec}]"] = _bits_per_dim(glow_in, test_sets)
        if sets.general is not None:
            glow_general = _fitted(_prepare_run(root / "general" / _slug(general_spec) / "glow", cfg, general_spec),
                                   cfg, sets.general.images, console)
            general_ll = loglik_of(glow_general, "general-domain Glow likelihoods")
            add({name: {"diff": glow_anomaly_scores(loglik[name], general_ll[name])["diff"]} for name in test_sets},
                "glow_")
            outlier_cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, init_from=str(in_path)))
            glow_outlier = _fitted(_prepare_run(root / _slug(in_spec) / "glow_outlier_loss", outlier_cfg, in_spec),
                                   outlier_cfg, sets.in_train.images, console, general=glow_general.network,
                                   outliers=sets.general.images)
            outlier_ll = loglik_of(glow_outlier, "outlier-loss Glow likelihoods")
            add({name: {"diff_outlier_loss": glow_anomaly_scores(outlier_ll[name], general_ll[name])["diff"]}
                 for name in test_sets}, "glow_")
            bpd[f"glow[{general_spec}]"] = _bits_per_dim(glow_general, test_sets)
            bpd[f"glow[{in_spec}]+outlier_loss"] = _bits_per_dim(glow_outlier, test_sets)

    if "fanogan" in cfgs:
        cfg = cfgs["fanogan"]
        run = _prepare_run(root / _slug(in_spec) / "fanogan", cfg, in_spec)
        detector = _fitted(run, cfg, sets.in_train.images, console, steps=cfg.training.steps + cfg.fanogan.encoder_steps)
        add(_score_sets(detector.score_samples, test_sets, console, "f-AnoGAN scores"), "")

    if "resnet" in cfgs:
        cfg = cfgs["resnet"]
        run = _prepare_run(root / _slug(in_spec) / "resnet", cfg, in_spec)
        detector = _fitted(run, cfg, sets.in_train.images, console, outliers=sets.general.images)
        add(_score_sets(lambda x: {"p_in": detector.score_samples(x)["p_in"]}, test_sets, console,
                        "ResNet p(in | x)"), "resnet_")

    if "simple" in cfgs:
        cfg = cfgs["simple"]
        run = _prepare_run(root / _slug(in_spec) / "simple", cfg, in_spec)
        detector = _fitted(run, cfg, sets.in_train.images, console, steps=0, needs="scorers.json")
        add(_score_sets(detector.score_samples, test_sets, console, "simple-baseline scores"), "simple_")

    report = {"in": in_spec, "out": list(out_specs), "general": general_spec,
              "n": {"train": len(sets.in_train), **{name: len(images) for name, images in test_sets.items()}},
              "pairs": results, "bpd": bpd, "seconds": time.perf_counter() - started}
    write_json(root / "benchmark.json", report)
    return report


def _bits_per_dim(detector: GlowDetector, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Bits/dim with standard dequantisation noise (one sample, S7.1) of each test set."""
    generator = torch.Generator().manual_seed(0)
    return {name: detector.bits_per_dim(images, generator) for name, images in sets.items()}
