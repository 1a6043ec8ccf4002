"""MSMA scoring and training at msma_quick size, every figure against a baseline of the same run.

- batched scoring (all scans' slices × all L levels through the network together) vs a naive loop
  of one network call per scan and noise level;
- scans/s end to end through ``neuro-ood score``'s pipeline (``score_scans`` on a run trained for
  two steps: preprocessing of 2 mm synthetic NIfTI scans + network + scorers + verdicts, after
  start-up), with preprocessing ahead of the network in a background thread (the default) against
  in turn with it (``--workers 0``), and of the network part alone;
- the network part with channels-last inputs and under ``torch.compile`` (``score.channels_last``,
  ``score.compile``), compile time apart, and the fastest path (batched, compiled, bf16) against
  the naive loop;
- DSM training steps/s at msma_quick's batch size;
- the network part's FLOP/s (FLOPs of convolutions and matrix products counted by
  ``torch.utils.flop_counter.FlopCounterMode``, 2 per multiply-add) against a 2048² float32 matmul
  timed here;
- peak resident memory (``ru_maxrss``) and, on a GPU, peak GPU memory.

    .venv/bin/python benchmarks/scoring.py [--scans 24] [--threads 1] [--device cuda]

``--device`` puts the network (and the matmul it is measured against) on that device, for every
figure; preprocessing and the scorers stay on the CPU.
"""

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from _setup import parse_arguments, write_scans
from _timing import best_of
from torch.utils.flop_counter import FlopCounterMode

from neuro_ood.config import load_config
from neuro_ood.data.synthetic import write_synthetic_cohort
from neuro_ood.detectors.msma import MSMADetector
from neuro_ood.features import score_norms
from neuro_ood.inference import inference_network
from neuro_ood.pipelines.datasets import dataset_adapter
from neuro_ood.pipelines.score import score_scans
from neuro_ood.pipelines.train import train
from neuro_ood.trainer.steps import dsm_step_fn
from neuro_ood.trainer.loop import optimization_manager, sample_rows

SCORERS = ["scorers.gmm={n_components: [1, 2, 3], cv: 3, n_jobs: 1}", "scorers.maf={epochs: 20}",
           "scorers.knn={n_neighbors: 5}"]


@torch.no_grad()
def naive_loop(network, items, sigmas):
    """One network call per scan and noise level: ``(n_scans, L)`` mean slice norms."""
    device = next(network.parameters()).device
    sigmas = sigmas.to(device)
    rows = []
    for item in items:
        x = torch.as_tensor(item.slices).to(device)
        rows.append([(s * network(x, s.repeat(len(x)))).flatten(1).norm(dim=1).mean().item() for s in sigmas])
    return np.array(rows)


def end_to_end_seconds(tmp: Path, paths, workers: int, device: str) -> float:
    """Wall time of ``score_scans`` on ``paths`` with a run trained for two steps on a small
    synthetic cohort (trained once, in ``tmp``), through a cache of its own (all preprocessing
    timed), after one warm-up scan."""
    run = tmp / "run"
    if not run.is_dir():
        cohort = write_synthetic_cohort(tmp / "cohort", n_inliers=16, ages=(1,), per_age=1, seed=1)
        cfg = load_config("msma_quick", SCORERS + ["training.steps=2", f"training.device={device}"])
        train(cfg, cohort, run, cache_dir=tmp / "train-cache", console=Console(quiet=True))
    quiet = Console(quiet=True)
    score_scans(run, paths[:1], cache_dir=tmp / "warm-up-cache", console=quiet, workers=workers)
    start = time.perf_counter()
    report = score_scans(run, paths, cache_dir=tmp / f"cache-{workers}", console=quiet, workers=workers)
    seconds = time.perf_counter() - start
    assert len(report.results) == len(paths) and not report.failures
    return seconds


def matmul_flops(device: torch.device, n: int = 2048) -> float:
    """FLOP/s of an ``n`` × ``n`` float32 matmul on ``device`` (as torch runs it there: TF32 where
    torch allows it on the GPU, as for the network)."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)

    def product():
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()   # kernels run asynchronously: time them to the end
    return 2 * n ** 3 / best_of(product, repeats=3)


def main():
    args = parse_arguments(24)
    cfg = load_config("msma_quick", SCORERS + [f"training.device={args.device}"])
    adapter = dataset_adapter(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, network on {args.device}"
          f"{' (' + torch.cuda.get_device_name(args.device) + ')' if args.device.startswith('cuda') else ''}; "
          f"msma_quick network, {args.scans} synthetic 2 mm scans")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scans(Path(tmp), args.scans)
        sources = adapter.sources_from_paths(paths)
        detector = MSMADetector(cfg)
        items = [item for source in sources[:2] for item in adapter.items(source, adapter.preprocess(source))]
        detector._start_network(items[0].slices.shape[1:], None, resume=False)
        detector._start_ema()

        start = time.perf_counter()
        items = [item for source in sources for item in adapter.items(source, adapter.preprocess(source))]
        preprocess_s = time.perf_counter() - start
        slices = np.concatenate([item.slices for item in items])
        detector.fit_scorers(detector.features(slices), None, None)

        turn_s = end_to_end_seconds(Path(tmp), paths, 0, args.device)
        end_to_end_s = end_to_end_seconds(Path(tmp), paths, 1, args.device)

        network, sigmas = detector.scoring_network, detector.sigmas
        batch = cfg.training.feature_batch_size
        with torch.inference_mode():
            batched_s = best_of(lambda: score_norms(network, slices, sigmas, batch_size=batch), repeats=2)
        naive_s = best_of(lambda: naive_loop(network, items, sigmas), repeats=1)
        with torch.inference_mode():
            few = slices[:12]  # bf16 is slow on CPUs without bfloat16 units: timed on 4 scans' slices
            fp32_few_s = best_of(lambda: score_norms(network, few, sigmas, batch_size=batch), repeats=1)
            bf16_s = best_of(lambda: score_norms(inference_network(network, "bf16"), few, sigmas,
                                                 batch_size=batch), repeats=1)
            channels_last_s = best_of(lambda: score_norms(inference_network(network, channels_last=True), slices,
                                                          sigmas, batch_size=batch), repeats=2)
            compiled = inference_network(network, compile=True)
            start = time.perf_counter()
            score_norms(compiled, slices, sigmas, batch_size=batch)   # compiles each batch shape once
            compile_s = time.perf_counter() - start
            compiled_s = best_of(lambda: score_norms(compiled, slices, sigmas, batch_size=batch), repeats=2)
            fastest = inference_network(network, "bf16", compile=True)
            score_norms(fastest, slices, sigmas, batch_size=batch)   # compiles
            fastest_s = best_of(lambda: score_norms(fastest, slices, sigmas, batch_size=batch), repeats=2)
            with FlopCounterMode(display=False) as counter:
                score_norms(network, slices, sigmas, batch_size=batch)
        flops = counter.get_total_flops()
        peak_matmul = matmul_flops(torch.device(args.device))

        train_net = detector.network
        optimizer = torch.optim.Adam(train_net.parameters(), lr=cfg.training.lr)
        step = dsm_step_fn(train_net, optimizer, sigmas, optimization_manager())
        sample = sample_rows({"x": torch.as_tensor(slices)}, cfg.training.batch_size)
        generator = torch.Generator().manual_seed(0)
        steps = 5
        step_s = best_of(lambda: [step(sample(generator), generator) for _ in range(steps)], repeats=1) / steps

    n = args.scans
    print(f"preprocessing: {n / preprocess_s:.2f} scans/s ({preprocess_s / n:.2f} s a scan, {len(slices)} slices)")
    print(f"end to end (score_scans: preprocess + network + scorers, after start-up): {n / end_to_end_s:.2f} "
          f"scans/s ({end_to_end_s:.1f} s for {n}; target >= 2 scans/s: {'met' if n / end_to_end_s >= 2 else 'not met'}); "
          f"preprocessing in turn with the network (--workers 0): {n / turn_s:.2f} scans/s, "
          f"so running it ahead in a thread gives {turn_s / end_to_end_s:.2f}x")
    print(f"network part alone, batched: {n / batched_s:.2f} scans/s ({batched_s:.2f} s); naive loop "
          f"(one call per scan and level): {naive_s:.2f} s; speed-up {naive_s / batched_s:.2f}x "
          f"(target >= 3x: {'met' if naive_s / batched_s >= 3 else 'not met'})")
    print(f"network part under bf16 autocast, 12 slices: {bf16_s:.2f} s vs fp32 {fp32_few_s:.2f} s: "
          f"{fp32_few_s / bf16_s:.2f}x fp32's speed")
    print(f"network part, channels-last: {channels_last_s:.2f} s ({batched_s / channels_last_s:.2f}x the default); "
          f"torch.compile: {compiled_s:.2f} s ({batched_s / compiled_s:.2f}x), after {compile_s:.0f} s compiling")
    print(f"fastest path (batched, compiled, bf16 autocast): {fastest_s:.2f} s, {naive_s / fastest_s:.2f}x the naive "
          f"fp32 loop (target >= 3x: {'met' if naive_s / fastest_s >= 3 else 'not met'}); {n / fastest_s:.1f} scans/s")
    print(f"network FLOPs: {flops / 1e9:.1f} GFLOP for {n} scans ({flops / n / 1e9:.2f} a scan); "
          f"2048² fp32 matmul {peak_matmul / 1e9:.1f} GFLOP/s")
    for name, seconds in (("default", batched_s), ("channels-last", channels_last_s), ("compiled", compiled_s)):
        achieved = flops / seconds
        print(f"  {name}: {achieved / 1e9:.1f} GFLOP/s, {achieved / peak_matmul:.0%} of matmul "
              f"(target >= 50%: {'met' if achieved >= 0.5 * peak_matmul else 'not met'})")
    print(f"training: {1 / step_s:.2f} DSM steps/s at batch {cfg.training.batch_size} ({step_s:.2f} s a step)")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if torch.device(args.device).type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB")


if __name__ == "__main__":
    main()
