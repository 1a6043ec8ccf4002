"""Scores and anomaly maps of whole volumes from one set of network passes, against the former
path that scored first and then made each map again (``score --maps``, ``evaluate --group-by
lesion``), at msma3d_quick size with its normative voxel model (the map is needed for the scan
score ``voxel_tail`` too, so the former path computed it twice).

The network is untrained (timing does not depend on its weights); the scorers and the voxel
model are fitted on the same synthetic 2 mm volumes.

    .venv/bin/python benchmarks/score_maps.py [--scans 6] [--threads 1] [--device cuda]
"""

import resource
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from _setup import parse_arguments, write_scans
from _timing import best_of, report

from neuro_ood.config import load_config
from neuro_ood.detectors.msma import MSMADetector
from neuro_ood.pipelines.common import score_items
from neuro_ood.pipelines.datasets import dataset_adapter

OVERRIDES = ["scorers.gmm={n_components: [1, 2], cv: 2, n_jobs: 1}", "scorers.maf={epochs: 5}",
             "scorers.knn={n_neighbors: 3}"]


def main():
    args = parse_arguments(6, "volumes (at least 4: the scorers are fitted on them)")
    cfg = load_config("msma3d_quick", OVERRIDES + [f"training.device={args.device}"])
    adapter = dataset_adapter(cfg)
    quiet = Console(quiet=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, network on {args.device}; "
          f"msma3d_quick network and normative voxel model (search radius {cfg.msma.voxel_search}), "
          f"{args.scans} synthetic 2 mm volumes")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_scans(Path(tmp), args.scans)
        items = [item for source in adapter.sources_from_paths(paths)
                 for item in adapter.items(source, adapter.preprocess(source))]
    volumes = np.concatenate([item.slices for item in items])
    detector = MSMADetector(cfg)
    detector._start_network(volumes.shape[1:], None, resume=False)
    detector.fit_scorers(detector.features(volumes), None, None)
    detector.fit_voxel_model(volumes)

    def scores_then_maps():
        score_items(detector, items, console=quiet)
        with torch.inference_mode():
            return [detector.maps(item.slices) for item in items]

    def one_pass():
        maps = []
        score_items(detector, items, console=quiet, on_maps=lambda index, heat, parts: maps.append(heat))
        return maps

    with torch.inference_mode():
        np.testing.assert_allclose(np.concatenate(one_pass()), np.concatenate(scores_then_maps()), rtol=1e-4, atol=1e-4)
    former_s = best_of(scores_then_maps, repeats=1)
    shared_s = best_of(one_pass, repeats=1)
    report(f"scores and maps of {args.scans} volumes from one pass", shared_s, former_s, "scores, then maps again")
    print(f"  {args.scans / shared_s:.2f} volumes/s against {args.scans / former_s:.2f}")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
