"""What the MSMA benchmark scripts share: their command line and their synthetic scans."""

import argparse
from pathlib import Path

import numpy as np
import torch

from neuro_ood.data.synthetic import synthesize_t1


def parse_arguments(scans: int, scans_help: str = "synthetic 2 mm scans") -> argparse.Namespace:
    """``--scans``, ``--threads`` (applied here) and ``--device``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", type=int, default=scans, help=scans_help)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the network runs (cpu, cuda, cuda:1, ...)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def write_scans(folder: Path, n: int) -> list[Path]:
    """``n`` synthetic 2 mm T1 scans of 9-11-year-olds (seed 0) as NIfTI files in ``folder``."""
    rng = np.random.default_rng(0)
    paths = []
    for index in range(n):
        path = Path(folder) / f"sub-{index:03d}_T1w.nii.gz"
        synthesize_t1(float(rng.uniform(9, 11)), rng).to_filename(path)
        paths.append(path)
    return paths
