"""T1 preprocessing of a 2 mm synthetic scan: on-disk cache hit vs full MONAI pipeline."""

import tempfile
from pathlib import Path

import numpy as np
from _timing import best_of, report

from neuro_ood.config import PreprocessingConfig
from neuro_ood.data.synthetic import synthesize_t1
from neuro_ood.preprocessing.cache import PreprocessedCache
from neuro_ood.preprocessing.presets import T1SlicePreprocessor


def main():
    with tempfile.TemporaryDirectory() as tmp:
        scan = Path(tmp) / "sub-01_T1w.nii.gz"
        synthesize_t1(10.0, np.random.default_rng(0)).to_filename(scan)
        preprocess = T1SlicePreprocessor(PreprocessingConfig())
        cache = PreprocessedCache(Path(tmp) / "cache", preprocess.fingerprint)
        compute = lambda: {"slices": preprocess(scan)}
        cache.get_or_compute([scan], compute)
        cached = best_of(lambda: cache.get_or_compute([scan], compute), repeats=5)
        full = best_of(lambda: preprocess(scan), repeats=5)
        report("preprocess one scan from the cache", cached, full, "full pipeline")


if __name__ == "__main__":
    main()
