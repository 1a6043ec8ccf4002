"""The report stage: rich tables of metrics and scores, and anomaly-map files."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from rich.markup import escape
from rich.table import Table

from neuro_ood.io import atomic_write

METRIC_COLUMNS = (("auroc", "AUROC"), ("aupr_in", "AUPR-in"), ("aupr_out", "AUPR-out"),
                  ("fpr_at_95_tpr", "FPR95"), ("detection_error", "DetErr"), ("fpr_at_80_tpr", "FPR80"))
CAPTION = ("inliers positive; higher is better for AUROC/AUPR, lower for FPR at 95%/80% TPR "
           "and detection error")


def metrics_tables(metrics: dict[str, Any]) -> list[Table]:
    """One table per scorer: a row per group, the paper's metrics in percent; where the run kept
    per-slice scores, a second row per group scores slices (the MSMA paper's unit) instead of scans."""
    groups = metrics["groups"]
    scorers = list(next(iter(groups.values()))["scorers"]) if groups else []
    n_in = metrics.get("inliers", {}).get("n", "?")
    method = {"msma": "MSMA", "glow": "Glow"}.get(metrics.get("method", "msma"), metrics.get("method"))
    group_by, unit = metrics.get("group_by", "age"), metrics.get("unit", "scan")
    tables = []
    for scorer in scorers:
        table = Table(title=f"{method} {scorer}: held-out inliers (n={n_in}) vs {group_by} group, per {unit}, %",
                      caption=CAPTION)
        table.add_column("age (y)" if group_by == "age" else group_by, justify="right")
        table.add_column("unit")
        table.add_column("n", justify="right")
        for _, header in METRIC_COLUMNS:
            table.add_column(header, justify="right")
        for group, entry in groups.items():
            values = entry["scorers"][scorer]
            table.add_row(group, unit, str(entry["n"]), *(f"{100 * values[k]:.1f}" for k, _ in METRIC_COLUMNS))
            if scorer in entry.get("slice_scorers", {}):
                values = entry["slice_scorers"][scorer]
                table.add_row("", "slice", str(entry["n_slices"]),
                              *(f"{100 * values[k]:.1f}" for k, _ in METRIC_COLUMNS))
        tables.append(table)
    return tables


def _score_text(value: float) -> str:
    """A score for a table cell: two decimals, or three significant digits once it is large (a
    flow's log-density of a far outlier can reach -1e30)."""
    return f"{value:.2f}" if abs(value) < 1e5 or not np.isfinite(value) else f"{value:.3g}"


def scores_table(results: Iterable[Any]) -> Table:
    """A row per scan: each scorer's score with its percentile among held-out inliers, the flag and,
    where the run has a site model, the domain-shift signal (is the scan unlike the training site?)."""
    results = list(results)
    table = Table(title="neuro-ood scores", caption="score (percentile among held-out inliers); "
                  "low = atypical; the flag is the primary scorer's 95%-TPR threshold; site: is the scan's "
                  "acquisition like the training scans' (percentile)?; paper_* scores in --json")
    table.add_column("scan", overflow="fold", min_width=12)
    scorers = list(results[0].scores) if results else []
    # MSMA's paper_* scores (the paper's L norms beside the configured features) stay in --json
    scorers = [n for n in scorers if not n.startswith("paper_")] or scorers
    for name in scorers:   # fold, never truncate: the scan column keeps its minimum width
        table.add_column(name, justify="right", overflow="fold")
    table.add_column("flag", overflow="fold")
    with_site = any(getattr(r, "site", None) for r in results)
    if with_site:
        table.add_column("site", justify="right", overflow="fold")
    for result in results:
        cells = [escape(Path(result.path).name)]  # the full path is in --json
        # the percentile on a line of its own keeps columns narrow enough for an 80-column terminal
        cells += [f"{_score_text(result.scores[n])}\n({result.percentiles[n]:.0f}%)" for n in scorers]
        cells.append(f"[bold red]ATYPICAL[/]\n({result.primary})" if result.flagged else "typical")
        if with_site:
            site = result.site
            cells.append("—" if site is None else
                         f"[bold yellow]UNLIKE[/]\n({site['site_percentile']:.0f}%)" if site["site_shift"]
                         else f"like\n({site['site_percentile']:.0f}%)")
        table.add_row(*cells)
    return table


def benchmark_tables(report: dict[str, Any]) -> list[Table]:
    """One table per in->out pair: a row per method and score, the paper's metrics in percent."""
    tables = []
    for pair, methods in report["pairs"].items():
        table = Table(title=escape(f"{pair}: per image, %"), caption=CAPTION)
        table.add_column("method")
        for _, header in METRIC_COLUMNS:
            table.add_column(header, justify="right")
        for method, values in methods.items():
            table.add_row(method, *(f"{100 * values[k]:.1f}" for k, _ in METRIC_COLUMNS))
        tables.append(table)
    return tables


def bpd_table(report: dict[str, Any]) -> Table:
    """Bits/dim of each Glow on each test set (dequantised, one sample)."""
    table = Table(title="Glow bits/dim")
    sets = list(next(iter(report["bpd"].values()))) if report["bpd"] else []
    table.add_column("model")
    for name in sets:
        table.add_column(name, justify="right")
    for model, values in report["bpd"].items():
        table.add_row(escape(model), *(f"{values[name]:.2f}" for name in sets))
    return table


def comparison_table(metrics: dict[str, Any], metric: str = "auroc", per_slice: bool = False) -> Table | None:
    """Several runs side by side: a row per method × score, a column per group; ``*`` marks a group
    the method saw in training (the ResNet baseline's outlier group). ``per_slice``: the slice-level
    metrics instead (the MSMA paper's unit), of the runs that kept them; None where none did."""
    runs = metrics["runs"]
    key, n_key = ("slice_scorers", "n_slices") if per_slice else ("scorers", "n")
    runs = {label: run for label, run in runs.items() if key in next(iter(run["groups"].values()), {})}
    if not runs:
        return None
    groups = list(next(iter(runs.values()))["groups"])
    unit = "slice" if per_slice else metrics.get("unit", "scan")
    group_by = metrics.get("group_by", "age")
    n_in = next(iter(runs.values()))["inliers"][n_key]
    seen = any(group in run.get("seen_groups", []) for run in runs.values() for group in groups)
    table = Table(title=f"{dict(METRIC_COLUMNS)[metric]} (%) per {unit}: held-out inliers (n={n_in}) vs "
                        f"{group_by} group", caption="* group seen in training (classifier baseline)" if seen else None)
    table.add_column("method")
    table.add_column("score")
    for group in groups:
        n = next(iter(runs.values()))["groups"][group][n_key]
        table.add_column(f"{group} (n={n})", justify="right")
    for label, run in runs.items():
        scorers = list(next(iter(run["groups"].values()))[key])
        for scorer in scorers:
            cells = []
            for group in groups:
                value = f"{100 * run['groups'][group][key][scorer][metric]:.1f}"
                cells.append(value + ("*" if group in run.get("seen_groups", []) else ""))
            table.add_row(escape(label), scorer, *cells)
    return table


def save_anomaly_maps(out_dir: Path, name: str, slices: np.ndarray, maps: np.ndarray,
                      spacing_mm: Sequence[float] = (1.0, 1.0), png: bool = True) -> list[Path]:
    """Write one item's voxel-level anomaly map as NIfTI and (with ``png``) as a PNG montage.

    ``slices`` ``(S, C, H, W)`` and ``maps`` ``(S, H, W)`` (higher = more anomalous); the NIfTI holds
    the maps as an ``(H, W, S)`` volume with in-plane voxel size ``spacing_mm``; the PNG shows each
    slice (first channel) beside its map. Returns the paths written.
    """
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).removesuffix(".nii.gz")
    volume = np.ascontiguousarray(np.moveaxis(maps.astype(np.float32), 0, -1))
    affine = np.diag([*(float(s) for s in spacing_mm[:2]), 1.0, 1.0])
    nifti_path = out_dir / f"{stem}_anomaly_map.nii.gz"
    with atomic_write(nifti_path) as tmp:
        tmp.write_bytes(gzip.compress(nib.Nifti1Image(volume, affine).to_bytes()))
    if not png:
        return [nifti_path]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(maps), figsize=(2.2 * len(maps), 4.4), squeeze=False)
    top = float(np.percentile(maps, 99.5)) or 1.0
    for index, (image, heat) in enumerate(zip(slices, maps)):
        axes[0, index].imshow(image[0].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[1, index].imshow(heat.T, cmap="inferno", origin="lower", vmin=0, vmax=top)
        for ax in axes[:, index]:
            ax.axis("off")
    fig.suptitle(f"{name}: slices and anomaly map", fontsize=9)
    fig.tight_layout()
    png_path = out_dir / f"{stem}_anomaly_map.png"
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return [nifti_path, png_path]


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, np.float64))
    image.set_sform(image.affine, code=1)   # scanner / aligned world: viewers place it by the affine
    image.set_qform(image.affine, code=1)
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), compresslevel=1)


def save_volume_maps(out_dir: Path, name: str, volume: np.ndarray, heat: np.ndarray, box_to_scan: np.ndarray,
                     scan_shape: Sequence[int], scan_affine: np.ndarray, spacing_mm: Sequence[float],
                     png: bool = True, unit: str = "") -> list[Path]:
    """Write a whole-volume anomaly map three ways; returns the paths written.

    ``volume`` and ``heat`` ``(X, Y, Z)`` on the model's box (RAS, ``spacing_mm``), ``box_to_scan``
    (4, 4) its voxel -> the scan's world mm; the scan's grid is ``scan_shape`` with ``scan_affine``.

    - ``<name>_anomaly_map.nii.gz``: the map resampled onto the scan's own grid, with the scan's
      affine: it overlays the input file in FSLeyes / ITK-SNAP / 3D Slicer as it is;
    - ``<name>_anomaly_map_model.nii.gz`` and ``<name>_model_t1.nii.gz``: the map and the
      preprocessed scan on the model's box (same world coordinates);
    - with ``png``, ``<name>_anomaly_map.png``: three orthogonal planes through the map's hot spot,
      titled with the map's ``unit``.
    """
    from neuro_ood.overlay import three_plane_overlay
    from neuro_ood.preprocessing.inverse import box_to_scan_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).removesuffix(".nii.gz").removesuffix(".nii")
    on_scan = box_to_scan_grid(heat, box_to_scan, scan_shape, scan_affine, order=1)
    written = []
    for suffix, data, affine in (("anomaly_map", on_scan, scan_affine), ("anomaly_map_model", heat, box_to_scan),
                                 ("model_t1", volume, box_to_scan)):
        path = out_dir / f"{stem}_{suffix}.nii.gz"
        with atomic_write(path) as tmp:
            tmp.write_bytes(_nifti_bytes(data, affine))
        written.append(path)
    if png:
        path = out_dir / f"{stem}_anomaly_map.png"
        three_plane_overlay(volume, heat, spacing_mm, path, title=f"{name}: anomaly map" + (f" ({unit})" if unit else ""))
        written.append(path)
    return written


def localisation_table(metrics: dict[str, Any]) -> Table | None:
    """Voxel-level localisation on the lesion scans (``evaluate --group-by lesion``): per localising
    run its maps, and intensity thresholding on the same voxels; pooled (one global threshold) and
    mean over scans, in %. None when no run produced voxel metrics."""
    located = metrics.get("localisation") or {}
    if not located:
        return None
    table = Table(title="Lesion localisation: voxel-level, inside the scan's foreground, %",
                  caption="foreground: the brain where registration applied the template's brain mask, else the "
                          "whole head; pooled: all lesion scans' voxels together, one threshold; per scan: mean over scans. "
                          "intensity = the image itself as the map (bright: hyperintense, dark: hypointense lesions); "
                          "'image only' = the voxel model's standard scores of the intensities alone, without the network")
    table.add_column("map")
    table.add_column("scans", justify="right")
    for header in ("AUROC", "AUPRC", "best Dice", "AUPRC/scan", "Dice/scan"):
        table.add_column(header, justify="right")

    def row(name: str, summary: dict[str, Any]) -> None:
        pooled, per_scan = summary["pooled"], summary["per_scan"]
        table.add_row(name, str(summary["n_scans"]), *(f"{100 * pooled[k]:.1f}" for k in ("auroc", "auprc", "best_dice")),
                      *(f"{100 * per_scan[k]['mean']:.1f}" for k in ("auprc", "best_dice")))

    baselines = None
    for label, entry in located.items():
        row(f"{label} map", entry["map"])
        for part, summary in entry.get("components", {}).items():
            row(f"{label} map, {part} only", summary)
        baselines = baselines or entry
    row("intensity (bright)", baselines["intensity_bright"])
    row("intensity (dark)", baselines["intensity_dark"])
    return table
