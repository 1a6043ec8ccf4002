"""Atomic file writes and safe (pickle-free) array/tensor files.

Every file neuro-ood writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder and moved into place with :func:`os.replace`, so a
crash never leaves a half-written config, checkpoint or cache entry behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from safetensors.numpy import load_file as _load_numpy, save_file as _save_numpy


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Save named numpy arrays as a safetensors file (no pickle)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_write(path) as tmp:
        _save_numpy(arrays, str(tmp))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load named numpy arrays written by :func:`save_arrays`."""
    return _load_numpy(str(path))
