"""Distributed training (torch.distributed: ``gloo`` on the CPU; ``nccl`` where two GPUs are
there) against a single process.

Two processes are started with ``torch.multiprocessing.spawn`` and torchrun's environment
variables (so :func:`neuro_ood.trainer.distributed.launch` joins them exactly as under torchrun);
they train a tiny MSMA detector with a global batch of 4 rows, 2 per process.

Why the losses agree to ``LOSS_RTOL``: every process draws the same global batch and the same
noise levels and noise for it as a single process does, and computes the network on its 2 rows;
the gradients are averaged over the 2 processes, which is the gradient of the mean over the 4
rows. What can differ is only the order of floating-point sums (2 + 2 rows averaged instead of 4
rows, the all-reduce's sum, convolutions on batches of 2 instead of 4), about 1e-7 relative per
float32 operation. Over 6 Adam steps they stay far below 1e-4 relative (measured: 1.2e-7), while
noise drawn per process instead of for the global batch changes the first loss by percents, and a
wrong row, or a learning rate scaled by the number of processes, every later one. Adam hardly
sees a gradient scale (summed instead of averaged gradients moved these losses by 1.3e-4 only),
so the averaging itself is checked directly (``_check_averaging``), and the rows each process
runs the network on are recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from neuro_ood.config import load_config
from neuro_ood.detectors import build_detector
from neuro_ood.errors import ConfigError
from neuro_ood.trainer import distributed

LOSS_RTOL = 1e-4
STEPS, HALF = 6, 3

OVERRIDES = ["model.channels=[4, 8]", "model.strides=[2]", "model.num_sigmas=4", "training.batch_size=4",
             f"training.steps={STEPS}", f"training.checkpoint_every={HALF}"]
#: ``gloo`` on the CPU everywhere; ``nccl`` where two GPUs are there (one process per GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="nccl needs two GPUs, one per process"))]


def _exact_float32() -> None:
    """No TF32 and deterministic cuDNN on GPUs, so the float32 rounding argument above holds there too."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _config(steps: int = STEPS, device: str = "cpu"):
    cfg = load_config("msma_quick", [*OVERRIDES, f"training.steps={steps}", f"training.device={device}"])
    cfg.scorers = {"gmm": {"n_components": [1], "cv": 2, "n_jobs": 1}}
    return cfg


def _images() -> np.ndarray:
    return np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)


def _fit(steps: int, checkpoint_dir: Path | None, device: str = "cpu") -> tuple[dict[int, float], object]:
    """Train; the losses reported per step ({step: loss}) and the detector."""
    losses: dict[int, float] = {}

    def progress(stage, done, total, loss):
        if stage == "train NCSN" and loss == loss:
            losses[done] = loss

    detector = build_detector(_config(steps, device))
    detector.fit(_images(), checkpoint_dir=checkpoint_dir, progress=progress)
    return losses, detector


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, device: str) -> None:
    """One of ``world`` processes: the environment torchrun would give it, then three runs."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if device == "cuda":
        _exact_float32()
    root = Path(root)
    results: dict = {}
    saves = {"n": 0}
    from neuro_ood.detectors.base import Detector
    original = Detector._save_train_state

    def counting(self, directory, state):
        saves["n"] += 1
        original(self, directory, state)

    Detector._save_train_state = counting
    from neuro_ood.trainer import steps as step_module
    rows: set[int] = set()
    dsm_loss = step_module.dsm_loss

    def recording(model, x, *args, **kwargs):  # the rows this process runs the network on
        rows.add(len(x))
        return dsm_loss(model, x, *args, **kwargs)

    step_module.dsm_loss = recording
    with distributed.launch(device) as shard:
        assert (shard.rank, shard.world) == (rank, world)
        results["averaged"] = _check_averaging(rank, distributed.rank_device(device))
        for name, steps in (("fresh", STEPS), ("resumed", STEPS), ("partial", HALF)):
            losses: dict[int, float] = {}
            left = False
            try:
                losses, detector = _fit(steps, root / name, device)
                results[name] = {"losses": losses, "step": detector.train_state.step,
                                 "scorers": sorted(detector.scorers)}
            except distributed.WorkerDone:
                left = True
            results[name] = {**results.get(name, {}), "left": left}
        results["saves"], results["rows"] = saves["n"], sorted(rows)
    (root / f"rank{rank}.json").write_text(json.dumps(results))


def _check_averaging(rank: int, device: torch.device) -> list:
    """Gradients after :func:`average_gradients`: rank-dependent, on one rank only, on none."""
    params = [torch.nn.Parameter(torch.zeros(3, device=device)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1), device=device)
    if rank == 1:
        params[1].grad = torch.full((3,), 4.0, device=device)
    distributed.average_gradients(params)
    return [None if p.grad is None else p.grad.tolist() for p in params]


def _close(a: dict, b: dict, steps) -> float:
    """Largest relative difference of the losses at ``steps``, asserted below LOSS_RTOL."""
    diffs = [abs(a[s] - b[s]) / abs(b[s]) for s in steps]
    assert max(diffs) < LOSS_RTOL, (a, b)
    return max(diffs)


@pytest.mark.parametrize("device", DEVICES)
def test_two_processes_train_like_one_and_resume_with_any_number(tmp_path, device):
    if device == "cuda":
        _exact_float32()
    reference, _ = _fit(STEPS, tmp_path / "reference", device)
    _fit(HALF, tmp_path / "half", device)         # 1 process to step 3; 2 processes go on from a copy
    shutil.copytree(tmp_path / "half", tmp_path / "resumed")
    # a resumed run reseeds its generator at the step it resumes from (seed + 3), so a resumed
    # trajectory is compared with one process resuming the same checkpoint
    reference_resumed, _ = _fit(STEPS, tmp_path / "half", device)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), device), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    main, other = ranks
    losses = {name: {int(k): v for k, v in main[name]["losses"].items()} for name in ("fresh", "resumed", "partial")}

    # the same loss trajectory as one process with the same global batch
    print("max relative loss difference, 2 processes vs 1:", _close(losses["fresh"], reference, range(1, STEPS + 1)))
    # resumed by 2 processes from a 1-process checkpoint at step 3: steps 4..6 as in one process
    assert main["resumed"]["step"] == STEPS and sorted(losses["resumed"]) == [4, 5, 6]
    _close(losses["resumed"], reference_resumed, range(HALF + 1, STEPS + 1))
    # rank 0 alone writes checkpoints (2 per 6-step run, 1 for the 3-step one: at step 3 and at the end),
    # fits the scorers and goes on; the other rank leaves after training
    assert main["saves"] == 2 + 1 + 1 and other["saves"] == 0
    assert main["averaged"] == other["averaged"] == [[1.5] * 3, [2.0] * 3, None]
    assert main["rows"] == other["rows"] == [2]   # each process computes its half of the batch of 4
    assert not any(main[name]["left"] for name in losses) and all(other[name]["left"] for name in losses)
    assert main["fresh"]["scorers"] == ["gmm", "paper_gmm"]   # band features + the paper's norms
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [
        "model.json", "model.safetensors", "train_state.pt"]

    # a 2-process checkpoint at step 3, resumed by 1 process
    resumed, detector = _fit(STEPS, tmp_path / "partial", device)
    assert detector.train_state.step == STEPS and sorted(resumed) == [4, 5, 6]
    _close(resumed, reference_resumed, range(HALF + 1, STEPS + 1))


def test_shards_split_the_global_batch_into_contiguous_rows_or_refuse():
    rows = [distributed.Shard(r, 2).take(torch.arange(8)) for r in range(2)]
    assert torch.equal(torch.cat(rows), torch.arange(8))
    assert distributed.Shard().take(torch.arange(5)).tolist() == list(range(5))
    with pytest.raises(ConfigError, match="multiple of 3"):
        distributed.Shard(0, 3).rows(4)


def test_without_torchrun_variables_nothing_is_initialised(monkeypatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with distributed.launch("cpu") as shard:
        assert shard == distributed.Shard() and not torch.distributed.is_initialized()
    assert distributed.backend_for("cuda:1") == "nccl" and distributed.backend_for("cpu") == "gloo"


def test_python_m_neuro_ood_cli_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "neuro_ood.cli", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "neuro-ood" in result.stdout
