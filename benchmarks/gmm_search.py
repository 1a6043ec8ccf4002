"""GMM component search (2-20 components, 10-fold CV): joblib n_jobs=2 with one BLAS thread vs serial."""

import numpy as np
from _timing import best_of, report

from neuro_ood.scorers import GMMScorer


def main():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(loc, 1.0, size=(1000, 10)) for loc in (0, 3, 6)])
    parallel = best_of(lambda: GMMScorer(n_jobs=2).fit(X), repeats=1)
    serial = best_of(lambda: GMMScorer(n_jobs=1).fit(X), repeats=1)
    report("GMM search on 3000×10, n_jobs=2", parallel, serial, "n_jobs=1")


if __name__ == "__main__":
    main()
