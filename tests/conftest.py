"""Shared fixtures: a tiny synthetic cohort at 4 mm and a matching CPU-tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from neuro_ood.cli.main import app
from neuro_ood.data.synthetic import write_synthetic_cohort

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Everything small: 4 mm voxels, 45×55 slices, a two-level U-Net, a few steps.
TINY_OVERRIDES = [
    "preprocessing.spacing_mm=[4.0, 4.0, 4.0]",
    "preprocessing.slice_size=[45, 55]",
    "preprocessing.slice_offsets=[-1, 0, 1]",
    "model.channels=[8, 16]",
    "model.strides=[2]",
    "training.steps=12",
    "training.batch_size=8",
    "training.checkpoint_every=6",
    "scorers.gmm={n_components: [1, 2], cv: 3, n_jobs: 1}",
    "scorers.maf={epochs: 3, hidden_features: 16}",
    "scorers.knn={n_neighbors: 3}",
    "msma.bands=3",
]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny convolutions run up to ~100× slower with two intra-op threads on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NEURO_OOD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """12 inliers aged 9-11 and 4 subjects at each of 1 and 6 years, 4 mm voxels (BIDS)."""
    root = tmp_path_factory.mktemp("cohort")
    return write_synthetic_cohort(root, n_inliers=12, ages=(1, 6), per_age=4, seed=3, resolution_mm=4.0)


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared development data is not beside this checkout)")
    return path


def invoke(*args):
    """Run the CLI in-process; any exception but the CLI's own exit is a test failure."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def set_args(overrides) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [arg for override in overrides for arg in ("--set", override)]
