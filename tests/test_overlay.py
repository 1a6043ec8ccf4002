import struct
import subprocess
import sys

import numpy as np
import pytest

from neuro_ood.overlay import PLANES, hot_spot, plane_layout, three_plane_overlay

SHAPE, SPACING = (30, 36, 12), (1.0, 1.0, 3.0)  # anisotropic: 3 mm slices along Z
HOT = (20, 10, 8)


def _scan():
    """A grey ellipsoid 'brain', a lesion blob at ``HOT`` and a noisy map with a stronger
    single-voxel spike elsewhere (which the smoothed hot spot must ignore)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    brain = ((x - 15) / 14) ** 2 + ((y - 18) / 17) ** 2 + ((z - 6) / 5.5) ** 2 < 1
    distance2 = (x - HOT[0]) ** 2 + (y - HOT[1]) ** 2 + (3 * (z - HOT[2])) ** 2
    mask = distance2 < 12
    volume = np.where(brain, 0.45, 0.0) + 0.4 * mask
    rng = np.random.default_rng(0)
    anomaly = 0.1 * rng.random(SHAPE) + np.exp(-distance2 / 8.0)
    anomaly[5, 30, 3] = 3.0
    return volume, anomaly, mask


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_overlay_writes_a_png_through_the_hot_spot(tmp_path):
    volume, anomaly, mask = _scan()
    path = tmp_path / "figs" / "scan_overlay.png"
    result = three_plane_overlay(volume, anomaly, SPACING, path, title="scan", mask=mask)
    assert result["path"] == path and path.is_file()
    assert result["voxel"] == HOT
    assert result["planes"] == {"axial": HOT[2], "coronal": HOT[1], "sagittal": HOT[0]}
    assert anomaly[HOT] >= result["threshold"] and result["vmax"] >= anomaly[HOT] - 1e-6
    width, height = _png_size(path.read_bytes())
    assert 400 <= width <= 2000 and 200 <= height <= 1000 and width > height
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_overlay_without_mask_and_with_explicit_scale(tmp_path):
    volume, anomaly, _ = _scan()
    anomaly[0, 0, 0] = np.nan  # non-finite voxels are simply not overlaid
    result = three_plane_overlay(volume * 800, anomaly, SPACING, tmp_path / "o.png", vmax=2.0, threshold=0.5)
    assert (result["vmax"], result["threshold"]) == (2.0, 0.5)
    assert _png_size((tmp_path / "o.png").read_bytes())[0] > 0


def test_hot_spot_smooths_away_single_voxel_spikes():
    _, anomaly, _ = _scan()
    assert hot_spot(anomaly, SPACING) == HOT
    assert hot_spot(anomaly, SPACING, sigma_mm=0) == (5, 30, 3)


def test_plane_layout_keeps_physical_aspect():
    panels = plane_layout((10, 12, 5), (1, 2, 3), (1.0, 2.0, 3.0))
    assert [p["name"] for p in panels] == list(PLANES)
    sizes = {p["name"]: (p["extent_mm"][1] - p["extent_mm"][0], p["extent_mm"][3] - p["extent_mm"][2])
             for p in panels}
    # axial: X (10 mm) across, Y (24 mm) up; coronal: X across, Z (15 mm) up; sagittal: Y across, Z up
    assert sizes == {"axial": (10.0, 24.0), "coronal": (10.0, 15.0), "sagittal": (24.0, 15.0)}
    assert {p["name"]: p["letters"] for p in panels} == {
        "axial": ("L", "R", "P", "A"), "coronal": ("L", "R", "I", "S"), "sagittal": ("P", "A", "I", "S")}
    volume = np.arange(600).reshape(10, 12, 5)
    assert volume[panels[0]["slicer"]].shape == (10, 12) and (volume[panels[0]["slicer"]] % 5 == 3).all()
    assert volume[panels[2]["slicer"]].shape == (12, 5) and (volume[panels[2]["slicer"]] // 60 == 1).all()


def test_invalid_inputs_raise(tmp_path):
    volume, anomaly, mask = _scan()
    with pytest.raises(ValueError, match="spacing"):
        three_plane_overlay(volume, anomaly, (1.0, 1.0), tmp_path / "x.png")
    with pytest.raises(ValueError, match="shape"):
        three_plane_overlay(volume, anomaly[:-1], SPACING, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_importing_the_module_is_cheap():
    probe = ("import sys, neuro_ood.overlay\n"
             "print(sorted(m for m in ('matplotlib', 'scipy', 'sklearn', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
