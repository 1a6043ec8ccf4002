"""Configs: shipped files load, typos and bad values are refused with one clear message."""

import re

import pytest

from neuro_ood import config
from neuro_ood.config import builtin_config_path, config_from_dict, load_config
from neuro_ood.errors import ConfigError

SHIPPED = [p.stem for p in builtin_config_path("msma_quick").parent.glob("*.yaml")]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    assert load_config(name).name == name


def test_overrides_are_typed_and_coerced():
    cfg = load_config("msma_quick", ["training.lr=1e-3", "resnet.outlier_group=1", "model.channels=[8, 16]",
                                     "model.strides=[2]"])
    assert cfg.training.lr == 0.001 and cfg.resnet.outlier_group == "1" and cfg.model.channels == [8, 16]


@pytest.mark.parametrize("override,message", [
    ("training.steps=5k", "training.steps must be an int"),
    ("data.heldout_fraction=0", "heldout_fraction must be in (0, 1)"),
    ("data.inlier_ages=10", "inlier_ages must be a list"),
    ("data.inlier_ages=[11, 9]", "inlier_ages must be [low, high]"),
    ("scorers.gmm=null", "scorers.gmm must be a mapping"),
    ("score.tpr=95", "score.tpr must be in (0, 1]"),
    ("model.chanels=[1]", "unknown config key(s) model.chanels"),
    ("training.augment=flip", "training.augment must be a list"),
    ("msma.voxel_search=-1", "voxel_search must be ≥ 0"),
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("msma_quick", [override])
    assert message in str(info.value)


@pytest.mark.parametrize("override,key,bad,valid", [
    ("method=msmaa", "method", "msmaa", "msma, glow, fanogan, resnet"),
    ("dataset=abdc", "dataset", "abdc", "abcd, brats, natural"),
    ("preprocessing.preset=T1", "preprocessing.preset", "T1", "t1, t1_volume, brats"),
    ("preprocessing.slice_fit=crop", "preprocessing.slice_fit", "crop", "pad, resize"),
    ("data.age_unit=decades", "data.age_unit", "decades", "auto, years, months, weeks, days"),
    ("preprocessing.modalities=[t1, t1c]", "preprocessing.modalities", "t1c", "t1, t1ce, t2, flair"),
    ("model.backbone=resnet", "model.backbone", "resnet", "unet, diffusion_unet"),
    ("model.variant=patch", "model.variant", "patch", "multiscale, local, fc"),
    ("training.outlier_loss=hinge", "training.outlier_loss", "hinge", "ratio, margin"),
    ("training.augment=[translate, rotate]", "training.augment[1]", "rotate", "translate, flip"),
    ("training.device=gpu", "training.device", "gpu", "auto, cpu, cuda, cuda:N, mps"),
    ("training.device=cuda:x", "training.device", "cuda:x", "auto, cpu, cuda, cuda:N, mps"),
    ("images.fit=crop", "images.fit", "crop", "resize, pad"),
    ("images.channels=2", "images.channels", "2", "null, 1, 3"),
    ("resnet.depth=20", "resnet.depth", "20", "10, 18, 34, 50"),
    ("score.primary=gmn", "score.primary", "gmn", "gmm, knn, maf"),
    ("scorers.svm={}", "scorers.svm", "svm", "gmm, knn, maf"),
])
def test_bad_choices_are_refused_at_load_with_key_value_and_choices(override, key, bad, valid):
    with pytest.raises(ConfigError) as info:
        load_config("msma_quick", [override])
    message = str(info.value)
    assert "\n" not in message and key in message and valid in message and bad in message


@pytest.mark.parametrize("override", [
    "training.device=cuda:1", "training.device=mps", "training.device=cpu", "data.age_unit=Months",
    "data.age_unit=days", "images.channels=null", "images.channels=3", "images.fit=pad",
    "training.augment=[flip, translate]", "model.variant=fc", "model.backbone=diffusion_unet",
    "preprocessing.slice_fit=resize", "training.outlier_loss=margin", "resnet.depth=10",
    "fanogan.betas=[0.5, 0.999]",
])
def test_valid_choices_load(override):
    load_config("msma_quick", [override])


@pytest.mark.parametrize("override,message", [
    ("fanogan.betas=[0.5]", "fanogan.betas must be Adam's [beta1, beta2], each in [0, 1)"),
    ("fanogan.betas=[0.0, 1.0]", "fanogan.betas must be Adam's [beta1, beta2], each in [0, 1)"),
    ("fanogan.betas=[-0.1, 0.9]", "fanogan.betas must be Adam's [beta1, beta2], each in [0, 1)"),
    ("model.strides=[2, 2]", "model.strides must have one stride per level after the first"),
    ("model.patch=3", "model.patch must be an even number"),
    ("preprocessing.slice_size=[90]", "preprocessing.slice_size must be [H, W]"),
    ("preprocessing.intensity_percentiles=[99, 1]", "preprocessing.intensity_percentiles must be [low, high]"),
    ("images.size=[32, 0]", "images.size must be [H, W]"),
    ("model.sigma_min=0", "0 < sigma_min ≤ sigma_max"),
    ("training.grad_clip=0", "training.grad_clip must be a positive gradient norm or null"),
    ("training.ema_decay=1.0", "training.ema_decay must be in (0, 1) or null"),
    ("training.warmup_steps=-1", "training.warmup_steps must be ≥ 0"),
])
def test_bad_shapes_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("msma_quick", [override])


def test_fanogan_betas_default_to_the_original_code():
    from neuro_ood.config import FAnoGANConfig
    assert FAnoGANConfig().betas == [0.0, 0.9]
    assert load_config("msma_quick").fanogan.betas == [0.0, 0.9]


@pytest.mark.parametrize("name", ["fanogan_quick", "fanogan_abcd", "fanogan_bench_quick"])
def test_fanogan_configs_use_the_original_adam_settings(name):
    cfg = load_config(name)
    assert cfg.training.lr == pytest.approx(1e-4) and cfg.fanogan.betas == [0.0, 0.9]


def test_renamed_scorers_get_a_hint():
    with pytest.raises(ConfigError, match="'flow' is now 'maf'.*'kdtree' is now 'knn'"):
        load_config("msma_quick", ["scorers.flow={epochs: 3}", "scorers.kdtree={n_neighbors: 3}"])


def test_an_old_run_config_with_the_old_scorer_names_still_loads():
    # A run saved before the rename holds scorers {gmm, flow, kdtree} in config.yaml; its fitted
    # scorers are restored by class name, so its config must keep loading.
    cfg = config_from_dict({"method": "msma", "scorers": {"gmm": {}, "flow": {}, "kdtree": {}}})
    assert set(cfg.scorers) == {"gmm", "flow", "kdtree"}


def test_choices_match_the_code_that_uses_them():
    from neuro_ood.backbones.glow_variants import GLOW_VARIANTS
    from neuro_ood.backbones.resnet import RESNET_LAYOUTS
    from neuro_ood.data.brats import MODALITIES
    from neuro_ood.data.cohort import YEARS_PER_UNIT
    from neuro_ood.pipelines.datasets import ADAPTERS
    from neuro_ood.scorers import SCORERS

    assert config.GLOW_VARIANTS == GLOW_VARIANTS
    assert set(config.RESNET_DEPTHS) == set(RESNET_LAYOUTS)
    assert config.MODALITIES == MODALITIES
    assert set(config.AGE_UNITS[1:]) | set(config._AGE_UNIT_ALIASES) == set(YEARS_PER_UNIT)
    assert set(ADAPTERS) <= set(config.DATASETS)
    assert set(config.SCORER_NAMES) == set(SCORERS)
    assert set(config._default_scorers()) == set(SCORERS)
