"""On-disk cache of preprocessed tensors, keyed by file content and preprocessing fingerprint."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from neuro_ood.io import load_arrays, save_arrays


def default_cache_dir() -> Path:
    """``$NEURO_OOD_CACHE``, else ``$XDG_CACHE_HOME/neuro-ood``, else ``~/.cache/neuro-ood``."""
    if os.environ.get("NEURO_OOD_CACHE"):
        return Path(os.environ["NEURO_OOD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuro-ood"


def content_digest(paths: Sequence[str | Path], chunk: int = 1 << 20) -> str:
    """SHA-256 over the contents of ``paths`` in order (one scan, or the files of one case)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


class PreprocessedCache:
    """``root/<fingerprint>/<sha256 of the files>.safetensors`` holding named arrays.

    A renamed or copied scan hits the cache; an edited one, or other preprocessing, misses it.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = Path(root) / fingerprint

    def get_or_compute(self, paths: Sequence[str | Path], compute: Callable[[], dict[str, np.ndarray]],
                       required: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """The cached arrays of ``paths``, or ``compute()``'s (then cached); an entry written before
        the preset produced every name in ``required`` is computed again."""
        entry = self.root / f"{content_digest(paths)}.safetensors"
        if entry.is_file():
            arrays = load_arrays(entry)
            if set(required) <= set(arrays):
                return arrays
        arrays = compute()
        save_arrays(entry, arrays)
        return arrays
