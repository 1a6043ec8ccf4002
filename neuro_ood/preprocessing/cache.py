"""On-disk cache of preprocessed tensors, keyed by file content and preprocessing fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from neuro_ood.io import load_arrays, save_arrays


def default_cache_dir() -> Path:
    """``$NEURO_OOD_CACHE``, else ``$XDG_CACHE_HOME/neuro-ood``, else ``~/.cache/neuro-ood``."""
    if os.environ.get("NEURO_OOD_CACHE"):
        return Path(os.environ["NEURO_OOD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuro-ood"


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class PreprocessedCache:
    """``root/<fingerprint>/<sha256 of the file>.safetensors``.

    A renamed or copied scan hits the cache; an edited one, or other preprocessing, misses it.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root) / fingerprint

    def get_or_compute(self, path: str | Path, compute: Callable[[Path], np.ndarray]) -> np.ndarray:
        entry = self.root / f"{file_digest(path)}.safetensors"
        if entry.is_file():
            return load_arrays(entry)["data"]
        data = compute(Path(path))
        save_arrays(entry, {"data": data})
        return data
