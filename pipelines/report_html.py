"""Rendering of ``neuro-ood report``: thumbnails, figures and the one self-contained ``report.html``.

Everything here works on plain data (the ``report.json`` dictionary, arrays of mid-planes), so that
the page can be rendered from fabricated results as well as from a scored cohort. Images are PNG,
embedded as base64 ``data:`` URLs; styles and the small script that sorts, filters and paginates
the per-scan table are inline (``report_template.html``), and a Content-Security-Policy forbids
every network request.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from importlib import resources
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

from neuro_ood.report import METRIC_COLUMNS  # noqa: E402

#: Thumbnails embedded at most (flagged scans first, then the sample of others); see ``select_thumbnails``.
MAX_THUMBNAILS = 300
#: Bytes of embedded thumbnails at most (base64), so that 1,000 scans stay well under 20 MB.
THUMBNAIL_BUDGET = 12 * 1024 * 1024


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def mid_planes(volume: np.ndarray) -> list[np.ndarray]:
    """The plane(s) shown for one item: of a ``(S, H, W)`` stack of 2-D slices the middle slice; of
    a ``(1, D, H, W)`` volume (3-D methods) the three orthogonal mid-planes."""
    if volume.ndim == 2:
        return [volume]
    if volume.ndim == 3:
        return [volume[len(volume) // 2]]
    volume = volume[0]
    return [np.take(volume, volume.shape[axis] // 2, axis=axis) for axis in range(3)]


def thumbnail_png(planes: Sequence[np.ndarray], heat: Sequence[np.ndarray] | None = None,
                  vmax: float | None = None, size: int = 200) -> bytes:
    """Grey-scale planes in [0, 1] side by side, each with its anomaly map (higher = more atypical)
    overlaid in the ``hot`` colormap, transparent below half of ``vmax``; pixels enlarged by a
    whole factor until the planes are about ``size`` pixels high or wide."""
    colormap = matplotlib.colormaps["hot"]
    tiles = []
    for index, plane in enumerate(planes):
        grey = np.clip(np.nan_to_num(np.asarray(plane, dtype=np.float32)), 0.0, 1.0)
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        if heat is not None:
            level = np.clip(np.nan_to_num(np.asarray(heat[index], dtype=np.float32)) / (vmax or 1.0), 0.0, 1.0)
            alpha = (0.85 * np.clip((level - 0.5) / 0.5, 0.0, 1.0))[..., None]
            rgb = (1.0 - alpha) * rgb + alpha * colormap(level)[..., :3]
        tile = np.flipud(np.transpose(rgb, (1, 0, 2)))  # as save_anomaly_maps draws them (x right, y up)
        tiles.append(tile)
    height = max(t.shape[0] for t in tiles)
    gap = np.zeros((height, 2, 3))
    row = []
    for tile in tiles:
        padded = np.zeros((height, tile.shape[1], 3))
        padded[:tile.shape[0]] = tile
        row += [padded, gap]
    image = Image.fromarray((np.concatenate(row[:-1], axis=1) * 255).round().astype(np.uint8))
    scale = max(1, round(size / max(max(t.shape[:2]) for t in tiles)))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def group_sort_key(group: str) -> tuple:
    try:
        return (0, float(group), group)
    except ValueError:
        return (1, 0.0, group)


def distribution_figure(label: str, scorers: Sequence[str], reference: dict[str, Sequence[float]],
                        thresholds: dict[str, float], scans: Sequence[dict[str, Any]], group_by: str) -> bytes:
    """Per scorer: the held-out reference and the cohort's scans by group, jittered; the flag
    threshold dashed; flagged scans as red crosses."""
    fig, axes = plt.subplots(1, len(scorers), figsize=(4.6 * len(scorers), 3.4), squeeze=False)
    rng = np.random.default_rng(0)
    scored = [s for s in scans if label in s["results"]]
    groups = sorted({s["group"] for s in scored if s["group"] is not None}, key=group_sort_key)
    if any(s["group"] is None for s in scored):
        groups.append(None)
    names = ["reference"] + [("?" if g is None else g) for g in groups]
    for ax, scorer in zip(axes[0], scorers):
        ref = np.asarray([v for v in reference[scorer] if v is not None], dtype=float)
        columns = []
        for group in groups:
            members = [s["results"][label] for s in scored if s["group"] == group
                       and s["results"][label]["scores"][scorer] is not None]
            columns.append((np.array([m["scores"][scorer] for m in members], dtype=float),
                            np.array([m["flags"][scorer] for m in members], dtype=bool)))
        # far outliers (e.g. -6000 against a reference within ±5) would flatten everything else:
        # the axis stops 10 reference spans below the threshold, the scans beyond it drawn on its edge
        span = float(np.ptp(ref)) if len(ref) > 1 and np.ptp(ref) > 0 else 1.0
        everything = np.concatenate([ref, *(values for values, _ in columns)])
        floor = max(float(everything.min()), thresholds[scorer] - 10 * span) if len(everything) else -np.inf
        ax.scatter(rng.uniform(-0.25, 0.25, len(ref)), np.maximum(ref, floor), s=9, color="#2a9d8f", alpha=0.7,
                   linewidths=0)
        for position, (values, flagged) in enumerate(columns, start=1):
            x = position + rng.uniform(-0.25, 0.25, len(values))
            below = values < floor
            shown = np.maximum(values, floor)
            ax.scatter(x[~flagged], shown[~flagged], s=9, color="#457b9d", alpha=0.7, linewidths=0)
            ax.scatter(x[flagged & ~below], shown[flagged & ~below], s=22, color="#d62828", marker="x", linewidths=1)
            if below.any():
                ax.scatter(x[below], shown[below], s=18, color="#d62828", marker="v", linewidths=0)
                ax.annotate(f"{int(below.sum())} below", (position, floor), textcoords="offset points",
                            xytext=(0, -11), ha="center", fontsize=6, color="#d62828", annotation_clip=False)
        ax.axhline(thresholds[scorer], color="#d62828", linestyle="--", linewidth=1)
        if np.isfinite(floor):
            top = float(everything.max())
            ax.set_ylim(floor - 0.06 * (top - floor + 1e-9), top + 0.06 * (top - floor + 1e-9))
        ax.set_xticks(range(len(names)), names, fontsize=8, rotation=45 if len(names) > 8 else 0)
        ax.set_title(f"{label} · {scorer}", fontsize=9)
        ax.set_xlabel(f"{group_by} group" if group_by == "tumour" else "age group (y)", fontsize=8, labelpad=8)
        ax.set_ylabel("score (higher = more typical)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def roc_figure(label: str, roc: dict[str, dict[str, dict[str, list[float]]]],
               metrics: dict[str, Any]) -> bytes:
    """Per scorer: one ROC curve (held-out inliers positive) per group, AUROC in the legend."""
    scorers = list(roc)
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.6 * len(scorers), 3.4), squeeze=False)
    for ax, scorer in zip(axes[0], scorers):
        for group, curve in roc[scorer].items():
            auroc = metrics["groups"][group]["scorers"][scorer]["auroc"]
            ax.plot(curve["fpr"], curve["tpr"], linewidth=1.2, label=f"{group} ({100 * auroc:.0f}%)")
        ax.plot([0, 1], [0, 1], color="#999", linewidth=0.8, linestyle=":")
        ax.set_title(f"{label} · {scorer}", fontsize=9)
        ax.set_xlabel("FPR (outliers kept)", fontsize=8)
        ax.set_ylabel("TPR (inliers kept)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, title="group (AUROC)", title_fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


# -- the page ---------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"


def table_data(report: dict[str, Any]) -> dict[str, Any]:
    """The per-scan table as columns + rows of plain values (what the page's script renders)."""
    columns = [{"key": "path", "label": "scan", "type": "text"},
               {"key": "subject", "label": "subject", "type": "text"},
               {"key": "session", "label": "session", "type": "text"},
               {"key": "age_years", "label": "age (y)", "type": "num", "digits": 1},
               {"key": "group", "label": "age group" if report["group_by"] == "age" else report["group_by"],
                "type": "text"},
               {"key": "role", "label": "role", "type": "text"}]
    several = len(report["runs"]) > 1
    for run in report["runs"]:
        prefix = f"{run['label']} · " if several else ""
        for scorer in run["scorers"]:
            star = " ★" if scorer == run["primary"] else ""
            base = f"{run['label']}.{scorer}"
            columns += [{"key": f"{base}.score", "label": f"{prefix}{scorer}{star} score", "type": "num", "digits": 3},
                        {"key": f"{base}.percentile", "label": f"{prefix}{scorer} %", "type": "num", "digits": 0},
                        {"key": f"{base}.flag", "label": f"{prefix}{scorer} flag", "type": "flag"}]
    columns.append({"key": "thumbnail", "label": "view", "type": "link"})
    rows = []
    for scan in report["scans"]:
        row = [scan["path"], scan["subject"], scan["session"], scan["age_years"], scan["group"], scan["role"]]
        for run in report["runs"]:
            result = scan["results"].get(run["label"])
            for scorer in run["scorers"]:
                row += ([result["scores"][scorer], result["percentiles"][scorer], result["flags"][scorer]]
                        if result else [None, None, None])
        row.append(f"t-{scan['id']}" if scan["thumbnail"] else None)
        rows.append(row)
    return {"columns": columns, "rows": rows, "flagged": [any(r["flagged"] for r in s["results"].values())
                                                           for s in report["scans"]]}


def _runs_section(report: dict[str, Any]) -> str:
    head = ("<tr><th>run</th><th>method</th><th>config</th><th>preprocessing</th><th>run fingerprint</th>"
            "<th>trained on</th><th>reference</th><th>steps</th><th>flag rule</th><th>thresholds</th>"
            "<th>this report</th></tr>")
    rows, configs = [], []
    for run in report["runs"]:
        thresholds = ", ".join(f"{name} {_fmt(value)}" for name, value in run["thresholds"].items())
        rows.append(
            f"<tr><td>{_e(run['label'])}</td><td>{_e(run['method'])}</td><td>{_e(run['config_name'])}</td>"
            f"<td><code>{_e(run['preprocessing_fingerprint'])}</code></td><td><code>{_e(run['fingerprint'])}</code></td>"
            f"<td>{run['training_subjects']} subjects</td><td>{run['reference_size']} {_e(report['unit'])}s</td>"
            f"<td>{run['steps']}</td><td>{_e(run['primary'])} below its {100 * run['tpr']:.0f}%-TPR threshold</td>"
            f"<td>{_e(thresholds)}</td><td>{run['scored']} scored, {run['reused']} reused</td></tr>")
        configs.append(f"<details><summary>config of {_e(run['label'])} ({_e(run['path'])})</summary>"
                       f"<pre>{_e(yaml.safe_dump(run['config'], sort_keys=False))}</pre></details>")
    return f"<table class='plain'>{head}{''.join(rows)}</table>{''.join(configs)}"


def _metrics_section(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    parts = []
    for run in report["runs"]:
        metrics = report["metrics"].get(run["label"])
        if not metrics or not metrics["groups"]:
            continue
        seen = set(run.get("seen_groups", []))
        head = "".join(f"<th>{_e(h)}</th>" for _, h in METRIC_COLUMNS)
        body = []
        for scorer in run["scorers"]:
            for group, entry in metrics["groups"].items():
                values = entry["scorers"][scorer]
                mark = "*" if group in seen else ""
                body.append(f"<tr><td>{_e(run['label'])}</td><td>{_e(scorer)}</td><td>{_e(group)}{mark}</td>"
                            f"<td>{entry['n']}</td>"
                            + "".join(f"<td>{100 * values[k]:.1f}</td>" for k, _ in METRIC_COLUMNS) + "</tr>")
        parts.append(f"<h3>{_e(run['label'])}: held-out inliers (n={metrics['inliers']['n']}) against each group</h3>"
                     f"<img class='figure' alt='ROC curves of {_e(run['label'])}' "
                     f"src='{data_url(figures['roc:' + run['label']])}'>"
                     f"<table class='plain metrics'><tr><th>run</th><th>score</th><th>group</th><th>n</th>{head}</tr>"
                     f"{''.join(body)}</table>")
    if not parts:
        return ("<p class='note'>No group of known outliers in this cohort (ages outside the inlier range, "
                "tumour labels), so no ROC curve.</p>")
    note = ("<p class='note'>Metrics in %, inliers positive: higher is better for AUROC and AUPR, lower for "
            "FPR at 95%/80% TPR and detection error. Inliers are the run's own held-out reference; a group's "
            "scans are those of this cohort outside the inlier range that the run neither trained on nor holds "
            "in its reference. * group seen in training (classifier baseline).</p>")
    return note + "".join(parts)


def _gallery(report: dict[str, Any], thumbnails: dict[str, list[tuple[str, bytes]]]) -> str:
    figures = []
    by_id = {scan["id"]: scan for scan in report["scans"]}
    for scan_id in report["thumbnails"].get("order", list(thumbnails)):
        scan, images = by_id.get(scan_id), thumbnails.get(scan_id)
        if not images or scan is None:
            continue
        verdicts = []
        for label, result in scan["results"].items():
            primary = result["primary"]
            state = "ATYPICAL" if result["flagged"] else "typical"
            verdicts.append(f"<span class='{'bad' if result['flagged'] else 'ok'}'>{_e(label)} {_e(primary)} "
                            f"{_fmt(result['scores'][primary])} ({result['percentiles'][primary]:.0f}%) "
                            f"{state}</span>")
        panels = "".join(f"<figure class='panel'><img alt='{_e(caption)}' src='{data_url(png)}'>"
                         f"<figcaption>{_e(caption)}</figcaption></figure>" for caption, png in images)
        panels = f"<div class='panels'>{panels}</div>"
        age = "" if scan["age_years"] is None else f" · {scan['age_years']:.1f} y"
        figures.append(f"<div class='thumb' id='t-{_e(scan['id'])}'><div class='caption'><b>{_e(scan['path'])}</b>"
                       f"{_e(age)}<br>{'<br>'.join(verdicts)}</div>{panels}</div>")
    info = report["thumbnails"]
    omitted = (f" {len(info['omitted'])} flagged scan(s) beyond the cap of {info['cap']} thumbnails are left out "
               "(their anomaly maps are in maps/)." if info["omitted"] else "")
    return (f"<p class='note'>Mid-plane of each scan (the middle of its slices) with the anomaly map overlaid "
            f"(hot colours = atypical) where the method localises. Flagged scans first, most atypical first, then "
            f"a sample of {info['sample']} others; <code>--show PATTERN</code> adds any scan.{_e(omitted)}</p>"
            + ("".join(figures) or "<p>No thumbnail.</p>"))


def _failures(report: dict[str, Any]) -> str:
    if not report["failed"]:
        return "<p>None: every scan of the cohort was scored.</p>"
    rows = "".join(f"<tr><td>{_e(f['path'])}</td><td>{_e(', '.join(f['runs']))}</td><td>{_e(f['reason'])}</td></tr>"
                   for f in report["failed"])
    return f"<table class='plain' id='failures'><tr><th>scan</th><th>run(s)</th><th>reason</th></tr>{rows}</table>"


def _distributions(report: dict[str, Any], figures: dict[str, bytes]) -> str:
    return "".join(f"<img class='figure' alt='score distributions of {_e(run['label'])}' "
                   f"src='{data_url(figures['dist:' + run['label']])}'>" for run in report["runs"]) + (
        "<p class='note'>Green: the run's held-out inlier reference; blue: this cohort's scans by group; red "
        "crosses: scans flagged by that score; dashed: the flag threshold; red triangles on the lower edge: scans "
        "scoring further below (the axis stops 10 reference ranges below the threshold; scores.csv has them "
        "all).</p>")


def render_html(report: dict[str, Any], figures: dict[str, bytes],
                thumbnails: dict[str, list[tuple[str, bytes]]]) -> str:
    """The page: ``report`` as written to ``report.json``, ``figures`` as PNG bytes keyed
    ``dist:<run>`` and ``roc:<run>``, ``thumbnails`` as ``{scan id: [(caption, PNG bytes)]}``."""
    template = resources.files("neuro_ood.pipelines").joinpath("report_template.html").read_text(encoding="utf-8")
    n_flagged = sum(any(r["flagged"] for r in s["results"].values()) for s in report["scans"])
    summary = (f"{len(report['scans'])} {_e(report['unit'])}s scored, {n_flagged} flagged by at least one run, "
               f"{len(report['failed'])} failed · cohort <code>{_e(report['cohort']['name'])}</code> "
               f"({_e(report['cohort']['kind'])}) · neuro-ood {_e(report['neuro_ood_version'])} · "
               f"{_e(report['created'])}")
    payload = json.dumps(table_data(report), separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    parts = {
        "TITLE": _e(f"neuro-ood report: {report['cohort']['name']}"),
        "SUMMARY": summary,
        "RUNS": _runs_section(report),
        "DISTRIBUTIONS": _distributions(report, figures),
        "METRICS": _metrics_section(report, figures),
        "GALLERY": _gallery(report, thumbnails),
        "FAILURES": _failures(report),
        "COMMAND": _e(report["command"]),
        "DATA": payload,
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda match: parts[match.group(1)], template)  # one pass
