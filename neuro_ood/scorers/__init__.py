"""Auxiliary scorers fitted on inlier score-norm vectors, and their pickle-free persistence.

Every scorer follows :class:`~neuro_ood.scorers.base.AuxiliaryScorer`: ``fit(X, groups=None)`` on
``(N, L)`` inlier vectors (``groups``: each row's subject, for grouped cross-validation),
``score_samples(X)`` returns ``(N,)`` with higher = more typical.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError

from neuro_ood.errors import ConfigError, NeuroOODError, RunError
from neuro_ood.io import load_arrays, read_json, save_arrays, write_json
from neuro_ood.scorers.base import AuxiliaryScorer
from neuro_ood.scorers.gmm import GMMScorer
from neuro_ood.scorers.knn import KNNScorer
from neuro_ood.scorers.maf import MAFScorer

# Registry names: ``maf`` is a masked autoregressive flow (nflows), not Glow; ``knn`` is the k-NN
# distance (queried through a KD-tree). Saved runs are restored by class name, not by these names.
SCORERS: dict[str, type[AuxiliaryScorer]] = {"gmm": GMMScorer, "maf": MAFScorer, "knn": KNNScorer}
ARRAYS_FILE = "scorers.safetensors"
META_FILE = "scorers.json"

__all__ = ["SCORERS", "AuxiliaryScorer", "GMMScorer", "KNNScorer", "MAFScorer",
           "build_scorer", "load_scorers", "save_scorers"]


def build_scorer(name: str, **params) -> AuxiliaryScorer:
    """An unfitted scorer by registry name (``"gmm"``, ``"maf"``, ``"knn"``)."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise NeuroOODError(
            f"Unknown scorer {name!r}; valid names: {', '.join(sorted(SCORERS))}."
        ) from None
    try:
        return cls(**params)
    except TypeError as err:
        raise ConfigError(f"scorers.{name}: {err}; parameters of {cls.__name__}: "
                          f"{', '.join(sorted(cls().get_params()))}") from None


def save_scorers(directory: str | os.PathLike, scorers: dict[str, AuxiliaryScorer]) -> None:
    """Write fitted scorers to ``directory/scorers.safetensors`` and ``directory/scorers.json``.

    Arrays are keyed ``"<name>/<key>"``; the JSON maps each name to its class and metadata.
    """
    directory = Path(directory)
    arrays, index = {}, {}
    for name, scorer in scorers.items():
        if not name or "/" in name:
            raise ValueError(f"Scorer name must be non-empty and contain no '/': {name!r}.")
        state, meta = scorer.get_state()
        arrays.update({f"{name}/{key}": value for key, value in state.items()})
        index[name] = {"class": type(scorer).__name__, "meta": meta}
    save_arrays(directory / ARRAYS_FILE, arrays)
    write_json(directory / META_FILE, index)


def load_scorers(directory: str | os.PathLike) -> dict[str, AuxiliaryScorer]:
    """Read scorers written by :func:`save_scorers`; fitted and ready to score."""
    directory = Path(directory)
    missing = [f for f in (ARRAYS_FILE, META_FILE) if not (directory / f).is_file()]
    if missing:
        raise RunError(f"{directory}: no fitted scorers (missing {', '.join(missing)}); "
                       "fit the scorers first.")
    try:
        index = read_json(directory / META_FILE)
        arrays = load_arrays(directory / ARRAYS_FILE)
    except (ValueError, OSError, SafetensorError) as err:
        raise RunError(f"{directory}: fitted scorers cannot be read ({str(err).splitlines()[0]}); "
                       "the run directory is damaged") from None
    classes = {cls.__name__: cls for cls in SCORERS.values()}
    scorers = {}
    for name, entry in index.items():
        cls = classes.get(entry.get("class"))
        if cls is None:
            raise RunError(f"{directory / META_FILE}: scorer {name!r} has unknown class "
                           f"{entry.get('class')!r}.")
        prefix = f"{name}/"
        state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        try:
            scorers[name] = cls.from_state(state, entry["meta"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise RunError(f"{directory}: scorer {name!r} cannot be restored: {exc}") from exc
    return scorers
