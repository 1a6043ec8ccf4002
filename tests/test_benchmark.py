"""The natural-image benchmark and the Fourier analysis, end to end on tiny data."""

import gzip
import json

import numpy as np
import pytest

from tests.conftest import invoke, set_args

TINY = [
    "images.size=[16, 16]", "images.n_train=48", "images.n_test=24",
    "model.channels=[4, 8]", "model.strides=[2]",
    "model.n_scales=2", "model.steps_per_scale=2", "model.hidden=8",
    "training.steps=4", "training.batch_size=16", "training.warmup_steps=2", "training.checkpoint_every=2",
    "scorers.gmm={n_components: [1, 2], cv: 3, n_jobs: 1}", "scorers.maf={epochs: 2, hidden_features: 16}",
    "scorers.knn={n_neighbors: 3}", "resnet.depth=10", "resnet.widen=0.125", "resnet.head_hidden=8",
    "fanogan.width=4", "fanogan.latent_dim=8", "fanogan.encoder_steps=3",
]
METRICS = {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "detection_error", "fpr_at_80_tpr"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    result = invoke("benchmark", "--in", "digits", "--out", "constant", "--out", "uniform", "--general", "photos",
                    "--model", "all", *set_args(TINY), "--run-dir", root)
    assert result.exit_code == 0, result.output
    return root, result


def test_benchmark_writes_every_method_for_every_pair(bench):
    root, result = bench
    report = json.loads((root / "benchmark.json").read_text())
    assert set(report["pairs"]) == {"digits->constant", "digits->uniform"}
    for methods in report["pairs"].values():
        assert set(methods) == {"msma_gmm", "msma_maf", "msma_knn", "glow_raw", "glow_last_scale",
                                "glow_diff", "glow_diff_outlier_loss", "fanogan", "resnet_p_in",
                                "simple_gmm", "simple_knn", "simple_maf"}  # TINY's scorers.maf reaches every config
        for values in methods.values():
            assert set(values) == METRICS and all(0 <= v <= 1 for v in values.values())
    assert set(report["bpd"]) == {"glow[digits]", "glow[photos]", "glow[digits]+outlier_loss"}
    assert all(np.isfinite(v) and v > 0 for model in report["bpd"].values() for v in model.values())
    assert "digits->constant" in result.stdout and "glow_last_scale" in result.stdout


def test_benchmark_reuses_trained_models(bench):
    root, _ = bench
    stamp = (root / "digits" / "glow" / "model.safetensors").stat().st_mtime_ns
    result = invoke("benchmark", "--in", "digits", "--out", "constant", "--model", "glow", *set_args(TINY),
                    "--run-dir", root)
    assert result.exit_code == 0, result.output
    assert (root / "digits" / "glow" / "model.safetensors").stat().st_mtime_ns == stamp
    report = json.loads((root / "benchmark.json").read_text())
    assert set(report["pairs"]["digits->constant"]) == {"glow_raw", "glow_last_scale"}
    # the simple baseline has no network and no training state, and is reused all the same
    stamp = (root / "digits" / "simple" / "scorers.safetensors").stat().st_mtime_ns
    result = invoke("benchmark", "--in", "digits", "--out", "constant", "--model", "simple", *set_args(TINY),
                    "--run-dir", root)
    assert result.exit_code == 0, result.output
    assert (root / "digits" / "simple" / "scorers.safetensors").stat().st_mtime_ns == stamp
    assert not (root / "digits" / "simple" / "model.safetensors").exists()
    report = json.loads((root / "benchmark.json").read_text())
    assert set(report["pairs"]["digits->constant"]) == {"simple_gmm", "simple_knn", "simple_maf"}


def test_fourier_analysis_on_a_benchmark_glow(bench, tmp_path):
    root, _ = bench
    figure = tmp_path / "mix.png"
    result = invoke("analyze", "fourier", "--run", root / "digits" / "glow", "--dataset", "photos", "--n", "12",
                    "--figure", figure)
    assert result.exit_code == 0, result.output
    assert "Spearman with amplitude source" in result.stdout and figure.stat().st_size > 0


def test_analysis_refuses_an_msma_run(bench):
    root, _ = bench
    result = invoke("analyze", "fourier", "--run", root / "digits" / "msma", "--dataset", "photos")
    assert result.exit_code == 2 and "Glow run" in result.stderr


def write_idx(path, array, magic):
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_benchmark_reads_a_data_root_with_only_a_test_split(tmp_path):
    rng = np.random.default_rng(0)
    images = np.zeros((60, 28, 28), np.uint8)
    images[:, 8:20, 12:16] = rng.integers(100, 255, (60, 12, 4))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 0x803)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 60), 0x801)
    result = invoke("benchmark", "--in", "mnist", "--out", "gaussian", "--data-root", tmp_path, "--model", "glow",
                    *set_args(TINY), "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "80/20" in result.stderr
    report = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert report["n"]["train"] == 48 and set(report["pairs"]) == {"mnist->gaussian"}


def test_benchmark_errors_are_one_line(tmp_path):
    result = invoke("benchmark", "--in", "cifar10", "--out", "svhn", "--data-root", tmp_path, "--run-dir", tmp_path)
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "cifar" in result.stderr.lower()
    result = invoke("benchmark", "--model", "pixelcnn", "--run-dir", tmp_path)
    assert result.exit_code == 2 and "msma, glow, fanogan, resnet, simple or all" in result.stderr
    result = invoke("benchmark", "--in", "digits", "--out", "constant", "--model", "resnet", "--run-dir", tmp_path)
    assert result.exit_code == 2 and "--general" in result.stderr


@pytest.mark.parametrize("variant", ["local", "fc"])
def test_glow_model_bias_variants_run_in_the_benchmark(tmp_path, variant):
    result = invoke("benchmark", "--in", "digits", "--out", "constant", "--model", "glow", *set_args(TINY),
                    "--set", f"model.variant={variant}", "--set", "model.patch=8", "--run-dir", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(report["pairs"]["digits->constant"]) == {"glow_raw", "glow_last_scale"}
    meta = json.loads((tmp_path / "digits" / "glow" / "model.json").read_text())
    assert meta["model"]["variant"] == variant and meta["image_size"] == [16, 16]
