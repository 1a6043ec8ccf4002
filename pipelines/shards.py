"""Sharded cohort scoring: ``--shard I/N`` picks a deterministic share of a cohort, and a shard's
manifest records what it is a share of, so that :mod:`neuro_ood.pipelines.merge` can assemble the
shards into one report and refuse shards that do not belong together.

Shards are numbered from 1 (``I`` in 1..N, as ``SLURM_ARRAY_TASK_ID`` with ``--array=1-N``). The
inputs are sorted by their key (a report's scan path relative to the cohort, ``score``'s path as
given) and shard ``I`` takes every N-th from the ``I``-th on, so the shares do not depend on the
order the inputs were listed in, and each holds a slice of every part of the sorted cohort.

    DIR/shard.json   the manifest, written when the shard has finished: shard I and N, the runs'
                     fingerprints (hash of config, preprocessing, weights, scorers, reference),
                     the cohort's identity (hash of the sorted keys of all its inputs), the keys
                     of the shard's share, its failed scans, its settings, inputs and run folders
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from neuro_ood.errors import ConfigError
from neuro_ood.io import read_json, write_json

MANIFEST = "shard.json"
MANIFEST_VERSION = 1
_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Share ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | None) -> Shard | None:
    """``"I/N"`` -> :class:`Shard` (None stays None); :class:`ConfigError` unless 1 ≤ I ≤ N."""
    if text is None:
        return None
    match = _SHARD.fullmatch(text)
    if not match:
        raise ConfigError(f"--shard {text!r}: give I/N, e.g. 3/8 for the third of 8 shards (numbered from 1)")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be in 1..N with N at least 1 (shards are numbered from 1)")
    return Shard(index, count)


def share(keys: Sequence[str], shard: Shard | None) -> list[int]:
    """Positions (in input order) of the inputs with ``keys`` that ``shard`` takes: sorted by key,
    every ``count``-th from the ``index``-th on; all positions without a shard."""
    if shard is None:
        return list(range(len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    return sorted(ranked[shard.index - 1::shard.count])


def identity(keys: Sequence[str]) -> str:
    """Short SHA-256 of the sorted ``keys``: the same set of inputs in any order gives the same value."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_json(out / MANIFEST, {"version": MANIFEST_VERSION, **manifest})


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in ``directory``, or None if it has none; :class:`ConfigError` if damaged."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: unreadable shard manifest ({err})") from None
    needed = {"version", "shard", "runs", "cohort", "settings", "keys", "failed", "inputs", "run_dirs"}
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION or needed - set(manifest):
        raise ConfigError(f"{path}: not a shard manifest of this neuro-ood version")
    return manifest


def check_shards(manifests: dict[Path, dict[str, Any]]) -> int:
    """The shard count N of ``{shard folder: manifest}`` when they are shards 1..N of one report
    (same runs, cohort and settings), each once; otherwise :class:`ConfigError` naming the problem."""
    (first_dir, first), *others = manifests.items()
    for directory, manifest in others:
        for field, what in (("runs", "runs"), ("cohort", "cohorts"), ("settings", "settings")):
            if manifest[field] != first[field]:
                raise ConfigError(f"{directory} and {first_dir} are shards of different {what} "
                                  f"({_show(manifest[field])} vs {_show(first[field])})")
        if manifest["shard"]["count"] != first["shard"]["count"]:
            raise ConfigError(f"{directory} and {first_dir} split the cohort differently "
                              f"({manifest['shard']['count']} vs {first['shard']['count']} shards)")
    count = int(first["shard"]["count"])
    seen: dict[int, Path] = {}
    for directory, manifest in manifests.items():
        index = int(manifest["shard"]["index"])
        if index in seen:
            raise ConfigError(f"shard {index}/{count} given twice ({seen[index]} and {directory})")
        seen[index] = directory
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in seen]
    if missing:
        raise ConfigError(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing "
                          f"(got {len(seen)} of {count})")
    return count


def _show(value: Any) -> str:
    if isinstance(value, dict) and "identity" in value:
        return f"cohort {value['identity']} of {value.get('n_inputs')} inputs"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
