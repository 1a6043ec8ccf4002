"""Configs: shipped files load, typos and bad values are refused with one clear message."""

import pytest

from neuro_ood.config import builtin_config_path, load_config
from neuro_ood.errors import ConfigError

SHIPPED = [p.stem for p in builtin_config_path("msma_quick").parent.glob("*.yaml")]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads(name):
    assert load_config(name).name == name


def test_overrides_are_typed_and_coerced():
    cfg = load_config("msma_quick", ["training.lr=1e-3", "resnet.outlier_group=1", "model.channels=[8, 16]"])
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
])
def test_bad_values_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("msma_quick", [override])
    assert message in str(info.value)
