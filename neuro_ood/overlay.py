"""Three-plane overlay figures of a 3-D anomaly map on its volume.

Arrays are in RAS voxel order: axis 0 = X (left -> right), axis 1 = Y (posterior -> anterior),
axis 2 = Z (inferior -> superior). Panels are drawn with X increasing to the right on screen
(so the patient's left is on the screen's left, the neurological view) and labelled with
orientation letters at their edges rather than assuming a radiological or neurological
convention. matplotlib and scipy are imported inside the functions, so importing this module is
cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from neuro_ood.io import atomic_write

PLANES = ("axial", "coronal", "sagittal")
# plane -> (fixed axis, horizontal axis, vertical axis, letters at left/right/bottom/top edges)
_LAYOUT = {"axial": (2, 0, 1, ("L", "R", "P", "A")),
           "coronal": (1, 0, 2, ("L", "R", "I", "S")),
           "sagittal": (0, 1, 2, ("P", "A", "I", "S"))}
_AXIS_NAMES = "xyz"


def _spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be three positive voxel sizes in mm, got {spacing_mm!r}.")
    return spacing  # type: ignore[return-value]


def hot_spot(anomaly_map, spacing_mm: Sequence[float], sigma_mm: float = 2.0) -> tuple[int, int, int]:
    """Voxel of maximal anomaly after Gaussian smoothing (so a lone noisy voxel does not win).

    Parameters
    ----------
    anomaly_map : array-like of float, shape (X, Y, Z)
        Higher = more atypical; non-finite voxels count as the map's minimum.
    spacing_mm : sequence of 3 floats
        Voxel size in mm along X, Y, Z (the smoothing is isotropic in mm).
    sigma_mm : float
        Standard deviation of the Gaussian in mm; 0 takes the raw maximum.

    Returns
    -------
    tuple of 3 ints
        ``(x, y, z)`` voxel indices (the first maximum in C order on ties).
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 3:
        raise ValueError(f"anomaly_map must be 3-D (X, Y, Z), got shape {values.shape}.")
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError("anomaly_map has no finite value.")
    values = np.where(finite, values, values[finite].min())
    if sigma_mm > 0:
        from scipy.ndimage import gaussian_filter

        values = gaussian_filter(values, [sigma_mm / s for s in _spacing(spacing_mm)], mode="nearest")
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(values)), values.shape))


def plane_layout(shape: Sequence[int], voxel: Sequence[int], spacing_mm: Sequence[float]) -> list[dict]:
    """The three orthogonal planes through ``voxel`` and how each is drawn.

    Returns
    -------
    list of dict, one per plane in ``PLANES`` order
        ``name``; ``axis`` (the fixed array axis) and ``index`` (its voxel index); ``slicer`` (the
        index tuple giving the 2-D ``(horizontal, vertical)`` slice); ``extent_mm``
        ``(left, right, bottom, top)`` of the voxel edges in mm, which with an equal aspect makes
        anisotropic voxels come out at their physical size; ``letters`` at the left, right, bottom
        and top edges.
    """
    spacing = _spacing(spacing_mm)
    panels = []
    for name in PLANES:
        fixed, h, v, letters = _LAYOUT[name]
        slicer = [slice(None)] * 3
        slicer[fixed] = int(voxel[fixed])
        extent = (-0.5 * spacing[h], (shape[h] - 0.5) * spacing[h],
                  -0.5 * spacing[v], (shape[v] - 0.5) * spacing[v])
        panels.append({"name": name, "axis": fixed, "index": int(voxel[fixed]), "slicer": tuple(slicer),
                       "extent_mm": extent, "letters": letters})
    return panels


def _default_range(values: np.ndarray, voxel: tuple[int, int, int], vmax: float | None,
                   threshold: float | None) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if vmax is None:  # report.save_anomaly_maps' 99.5th percentile misses lesions under 0.5% of voxels
        peak = float(values[voxel]) if np.isfinite(values[voxel]) else -np.inf
        vmax = max(float(np.percentile(finite, 99.5)), peak)
    if threshold is None:
        typical = float(np.median(finite))
        threshold = typical + 0.5 * (vmax - typical)
    return float(vmax), float(threshold)


def three_plane_overlay(volume, anomaly_map, spacing_mm: Sequence[float], path: str | os.PathLike,
                        title: str | None = None, mask=None, vmax: float | None = None, *,
                        threshold: float | None = None, sigma_mm: float = 2.0, alpha: float = 0.6) -> dict:
    """Write a PNG of axial, coronal and sagittal planes through the anomaly maximum.

    Each panel shows the volume in grey, the anomaly map as a semi-transparent hot overlay where
    it reaches ``threshold`` and, when given, the lesion mask's outline in cyan; the planes cross
    at :func:`hot_spot` of the map. The PNG is written atomically.

    Parameters
    ----------
    volume : array-like of float, shape (X, Y, Z)
        Image in RAS voxel order; shown on [0, 1] when it lies there (as the preprocessing
        scales it), otherwise on its 0.5-99.5 percentile range.
    anomaly_map : array-like of float, shape (X, Y, Z)
        Higher = more atypical; non-finite voxels are not overlaid.
    spacing_mm : sequence of 3 floats
        Voxel size in mm along X, Y, Z; panels keep physical aspect ratios.
    path : str or path-like
        Destination PNG.
    title : str, optional
        Figure title (the chosen voxel is appended).
    mask : array-like of bool, shape (X, Y, Z), optional
        Lesion mask (non-zero = lesion), drawn as a contour.
    vmax : float, optional
        Top of the overlay colour scale (map units); default the larger of the map's 99.5th
        percentile and its value at the hot spot (a lesion can be far under 0.5% of the voxels).
    threshold : float, optional
        Overlay only voxels with ``map >= threshold``; default halfway from the map's median to
        ``vmax``.
    sigma_mm : float
        Smoothing used to find the hot spot (see :func:`hot_spot`).
    alpha : float
        Opacity of the overlay.

    Returns
    -------
    dict
        ``path`` (Path written), ``voxel`` (``(x, y, z)`` where the planes cross), ``planes``
        (``{"axial": z, "coronal": y, "sagittal": x}``), ``threshold`` and ``vmax`` (map units).
    """
    image = np.asarray(volume, dtype=np.float32)
    heat = np.asarray(anomaly_map, dtype=np.float32)
    if image.ndim != 3 or image.shape != heat.shape:
        raise ValueError(f"volume {image.shape} and anomaly_map {heat.shape} must be the same 3-D shape.")
    lesion = None if mask is None else np.asarray(mask) != 0
    if lesion is not None and lesion.shape != image.shape:
        raise ValueError(f"mask {lesion.shape} and volume {image.shape} differ in shape.")
    spacing = _spacing(spacing_mm)
    voxel = hot_spot(heat, spacing, sigma_mm)
    vmax, threshold = _default_range(heat, voxel, vmax, threshold)
    panels = plane_layout(image.shape, voxel, spacing)

    import matplotlib.patheffects as patheffects
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    shown = image[np.isfinite(image)]
    grey = (0.0, 1.0) if shown.size == 0 or (shown.min() >= 0 and shown.max() <= 1) \
        else tuple(float(q) for q in np.percentile(shown, [0.5, 99.5]))
    hot = ListedColormap(colormaps["hot"](np.linspace(0.3, 1.0, 256)))  # skip hot's black end
    widths = [p["extent_mm"][1] - p["extent_mm"][0] for p in panels]
    heights = [p["extent_mm"][3] - p["extent_mm"][2] for p in panels]
    fig_width = float(np.clip(3.2 * sum(widths) / max(heights), 6.0, 14.0)) + 0.8
    fig = Figure(figsize=(fig_width, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    stroke = [patheffects.withStroke(linewidth=1.5, foreground="black")]
    overlay = None
    for ax, panel in zip(axes, panels):
        left, right, bottom, top = extent = panel["extent_mm"]
        ax.imshow(image[panel["slicer"]].T, cmap="gray", origin="lower", vmin=grey[0], vmax=grey[1],
                  extent=extent, aspect="equal", interpolation="nearest")
        plane = heat[panel["slicer"]].T
        overlay = ax.imshow(np.ma.masked_where(~(plane >= threshold), plane), cmap=hot, origin="lower",
                            vmin=threshold, vmax=max(vmax, threshold), alpha=alpha, extent=extent,
                            aspect="equal", interpolation="nearest")
        if lesion is not None:
            outline = lesion[panel["slicer"]].T
            if outline.any() and not outline.all():
                rows, cols = outline.shape  # contour at voxel centres, in mm like the extent
                xs = left + (np.arange(cols) + 0.5) * (right - left) / cols
                ys = bottom + (np.arange(rows) + 0.5) * (top - bottom) / rows
                ax.contour(xs, ys, outline.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8)
        for (x, y, ha, va), letter in zip(((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
                                           (0.5, 0.02, "center", "bottom"), (0.5, 0.98, "center", "top")),
                                          panel["letters"]):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=8,
                    path_effects=stroke)
        ax.set_title(f"{panel['name']} {_AXIS_NAMES[panel['axis']]}={panel['index']}", fontsize=8)
        ax.axis("off")
    fig.colorbar(overlay, ax=list(axes), shrink=0.8, pad=0.01).ax.tick_params(labelsize=7)
    fig.suptitle(f"{title or 'anomaly map'}: planes through voxel {voxel}", fontsize=9)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return {"path": path, "voxel": voxel, "planes": {p["name"]: p["index"] for p in panels},
            "threshold": threshold, "vmax": vmax}
