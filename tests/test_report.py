"""``neuro-ood report`` on the tiny cohort: files, agreement with ``score --json``, resume, failed
scans, no header text in the outputs, the page's size at 1,000 scans, and the page in a real browser."""

import csv
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from types import SimpleNamespace

from tests.conftest import TINY_OVERRIDES, invoke, set_args

TINY_T1 = [o for o in TINY_OVERRIDES if o.startswith("preprocessing.")]
TINY_FANOGAN = [*TINY_T1, "fanogan.width=4", "fanogan.latent_dim=8", "fanogan.encoder_steps=3",
                "training.steps=3", "training.batch_size=8", "training.checkpoint_every=2"]
MARKER = "PHIMARK7Q"
BROKEN = ("sub-0002", "sub-0015")  # an inlier and an outlier, made unreadable


@pytest.fixture(scope="module")
def runs(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    commands = {"msma": ["train", "--config", "msma_quick", *set_args(TINY_OVERRIDES)],
                "fanogan": ["baseline", "fanogan", "--config", "fanogan_quick", *set_args(TINY_FANOGAN)]}
    for name, command in commands.items():
        result = invoke(*command, "--dataset", "abcd", "--data-dir", tiny_cohort, "--out", root / name)
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def cohort(tiny_cohort, tmp_path_factory):
    """The tiny cohort with header text fields holding a marker in one scan and two unreadable scans."""
    root = tmp_path_factory.mktemp("report-cohort") / "cohort"
    shutil.copytree(tiny_cohort, root)
    target = root / "sub-0001" / "anat" / "sub-0001_T1w.nii.gz"
    image = nib.load(target)
    header = image.header.copy()
    header["descrip"] = f"{MARKER} patient name"
    header["db_name"] = MARKER
    header["aux_file"] = MARKER
    header["intent_name"] = MARKER
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), image.affine, header), target)
    assert MARKER.encode() in gzip.decompress(target.read_bytes())
    for subject in BROKEN:
        path = root / subject / "anat" / f"{subject}_T1w.nii.gz"
        path.write_bytes(path.read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def reported(runs, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = invoke("report", cohort, "--run", runs / "msma", "--run", runs / "fanogan", "--out", out)
    return out, result


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_report_writes_every_file_and_lists_the_failed_scans(reported, cohort):
    out, result = reported
    assert result.exit_code == 1, result.output  # some scans failed, the rest are reported
    assert "Traceback" not in result.output
    for name in ("report.html", "report.json", "scores.csv", "scores.json"):
        assert (out / name).is_file(), name
    n = len(list(cohort.glob("sub-*/anat/*_T1w.nii.gz")))
    rows = _csv(out / "scores.csv")
    report = json.loads((out / "report.json").read_text())
    assert len(rows) == len(report["scans"]) == n - len(BROKEN)
    failed = report["failed"]
    assert sorted(f["path"] for f in failed) == [f"{s}/anat/{s}_T1w.nii.gz" for s in BROKEN]
    assert all(f["reason"] and f["runs"] == ["msma", "fanogan"] for f in failed)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(BROKEN)
    assert [r["label"] for r in report["runs"]] == ["msma", "fanogan"]
    for run in report["runs"]:
        assert run["reference_size"] > 0 and run["training_subjects"] > 0 and len(run["preprocessing_fingerprint"]) == 16
    assert {"1", "6"} <= set(report["metrics"]["msma"]["groups"])
    assert 0 <= report["metrics"]["msma"]["groups"]["1"]["scorers"]["gmm"]["auroc"] <= 1
    # paths relative to the cohort, BIDS entities and ages from its tables
    first = rows[0]
    assert first["path"] == "sub-0001/anat/sub-0001_T1w.nii.gz" and first["subject"] == "sub-0001"
    assert 9 <= float(first["age_years"]) <= 11 and first["group"] in {"9", "10", "11"}
    sidecar = json.loads((out / "scores.json").read_text())
    assert list(sidecar) == list(rows[0]) and sidecar["age_years"]["Units"] == "years"
    assert sidecar["msma.gmm.percentile"]["Units"] == "percent"
    # maps as NIfTI for the scans each localising run flags
    for run in ("msma", "fanogan"):
        flagged = [r for r in rows if r[f"{run}.flagged"] == "true"]
        assert len(list((out / "maps" / run).glob("*_anomaly_map.nii.gz"))) == len(flagged)


def test_scores_csv_and_report_json_agree_with_score_json(reported, runs, cohort):
    out, _ = reported
    rows = {r["path"]: r for r in _csv(out / "scores.csv")}
    report = {s["path"]: s for s in json.loads((out / "report.json").read_text())["scans"]}
    for label in ("msma", "fanogan"):
        result = invoke("score", *(cohort / path for path in rows), "--run", runs / label, "--json")
        assert result.exit_code == 0, result.output
        scans = json.loads(result.stdout)["scans"]
        assert len(scans) == len(rows)
        for scan in scans:
            path = Path(scan["path"]).relative_to(cohort).as_posix()
            row, entry = rows[path], report[path]["results"][label]
            assert entry["primary"] == scan["primary"] and entry["flagged"] == scan["flagged"]
            assert row[f"{label}.flagged"] == ("true" if scan["flagged"] else "false")
            for name, value in scan["scores"].items():
                assert float(row[f"{label}.{name}.score"]) == pytest.approx(value, rel=1e-5, abs=1e-6)
                assert entry["scores"][name] == pytest.approx(value, rel=1e-5, abs=1e-6)
                assert float(row[f"{label}.{name}.percentile"]) == pytest.approx(scan["percentiles"][name])
                assert row[f"{label}.{name}.flag"] == ("true" if scan["flags"][name] else "false")


def test_no_header_text_field_reaches_the_report(reported):
    out, _ = reported
    assert "sub-0001/anat/sub-0001_T1w.nii.gz" in (out / "scores.csv").read_text()
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name.endswith(".gz"):
                data = gzip.decompress(data)
            assert MARKER.encode() not in data, path


def test_resume_scores_only_the_missing_scans(reported, runs, cohort):
    out, _ = reported
    before = _csv(out / "scores.csv")
    cache = out / ".cache"
    entries = sorted(cache.glob("*/*.json"))
    assert len(entries) == 2 * len(before)  # one per scan and run
    for entry in entries[:3]:
        entry.unlink()
    result = invoke("report", cohort, "--run", runs / "msma", "--run", runs / "fanogan", "--out", out)
    assert result.exit_code == 1, result.output
    resume = json.loads((out / "report.json").read_text())["resume"]
    assert sum(r["scored"] for r in resume.values()) == 3
    assert sum(r["reused"] for r in resume.values()) == 2 * len(before) - 3
    after = _csv(out / "scores.csv")
    assert [r["path"] for r in after] == [r["path"] for r in before]
    for old, new in zip(before, after):
        for key, value in old.items():
            if key.endswith(".score"):
                assert float(new[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6)
            else:
                assert new[key] == value, key


def test_interrupted_report_loses_nothing_and_scores_nothing_twice(runs, cohort, reported, tmp_path):
    from neuro_ood.pipelines.report import report

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        report([cohort], [runs / "msma"], out, stop_after=5)
    assert len(list((out / ".cache").glob("*/*.json"))) == 5
    assert not (out / "report.html").exists()
    summary = report([cohort], [runs / "msma"], out, maps="none", workers=2, cache_dir=tmp_path / "cache")
    n = len(list(cohort.glob("sub-*/anat/*_T1w.nii.gz"))) - len(BROKEN)
    assert summary.runs["msma"] == {"scored": n - 5, "reused": 5}
    assert summary.n_scans == n and len(summary.failures) == len(BROKEN)
    # preprocessed in two processes (a fresh preprocessing cache): the same scores as one process
    serial = {r["path"]: r["msma.gmm.score"] for r in _csv(reported[0] / "scores.csv")}
    parallel = {r["path"]: r["msma.gmm.score"] for r in _csv(out / "scores.csv")}
    assert parallel.keys() == serial.keys()
    assert all(float(parallel[k]) == pytest.approx(float(serial[k]), rel=1e-5, abs=1e-6) for k in serial)
    again = report([cohort], [runs / "msma"], out, maps="none")
    assert again.runs["msma"] == {"scored": 0, "reused": n}


def test_report_writes_the_due_maps_from_the_scoring_passes(runs, cohort, tmp_path, monkeypatch):
    """An MSMA run's maps come out of the passes that score: with ``--maps all`` every scan's NIfTI
    map (and each flagged scan's thumbnail) is written as it is scored, and a map is made again only
    for the unflagged scans sampled as thumbnails; the maps equal ``score --maps``'s."""
    from neuro_ood.detectors.msma import MSMADetector
    from neuro_ood.pipelines.report import report

    calls = []
    maps = MSMADetector.maps
    monkeypatch.setattr(MSMADetector, "maps", lambda self, x: calls.append(len(x)) or maps(self, x))
    out = tmp_path / "out"
    report([cohort], [runs / "msma"], out, maps="all", sample=2, cache_dir=tmp_path / "cache")
    rows = _csv(out / "scores.csv")
    assert len(list((out / "maps" / "msma").glob("*_anomaly_map.nii.gz"))) == len(rows)
    unflagged = sum(r["msma.flagged"] != "true" for r in rows)
    assert 0 < unflagged < len(rows) and len(calls) == min(2, unflagged)
    monkeypatch.setattr(MSMADetector, "maps", maps)
    for row in (next(r for r in rows if r["msma.flagged"] == "true"), rows[0]):
        result = invoke("score", cohort / row["path"], "--run", runs / "msma", "--maps", tmp_path / row["subject"])
        assert result.exit_code == 0, result.output
        single = nib.load(next((tmp_path / row["subject"]).glob("*_anomaly_map.nii.gz"))).get_fdata()
        stem = row["path"].replace("/", "_").removesuffix(".nii.gz")
        written = nib.load(out / "maps" / "msma" / f"{stem}_anomaly_map.nii.gz").get_fdata()
        np.testing.assert_allclose(written, single, rtol=1e-5, atol=1e-6)


def test_report_of_files_and_bad_arguments(runs, cohort, tmp_path):
    scans = sorted(cohort.glob("sub-000[3-5]/anat/*_T1w.nii.gz"))
    result = invoke("report", *scans, "--run", runs / "msma", "--out", tmp_path / "files", "--maps", "none")
    assert result.exit_code == 0, result.output
    rows = _csv(tmp_path / "files" / "scores.csv")
    assert [r["subject"] for r in rows] == ["sub-0003", "sub-0004", "sub-0005"]
    assert all(r["path"].startswith("sub-000") for r in rows)
    for args in (["--maps", "some"], ["--workers", "-1"]):
        result = invoke("report", cohort, "--run", runs / "msma", "--out", tmp_path / "bad", *args)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    result = invoke("report", cohort, "--run", tmp_path / "no-run", "--out", tmp_path / "bad")
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "Traceback" not in result.output
    result = invoke("report", tmp_path / "no-cohort", "--run", runs / "msma", "--out", tmp_path / "bad")
    assert result.exit_code == 2 and "no such folder" in result.stderr and not (tmp_path / "bad").exists()


def _fake_report(n: int, flagged_every: int = 3) -> dict:
    rng = np.random.default_rng(0)
    scans = []
    for i in range(n):
        score = float(rng.normal())
        flagged = i % flagged_every == 0
        result = {"path": f"sub-{i:04d}/anat/sub-{i:04d}_T1w.nii.gz", "scores": {"gmm": score},
                  "percentiles": {"gmm": float(rng.uniform(0, 100))}, "flags": {"gmm": flagged},
                  "primary": "gmm", "flagged": flagged}
        scans.append({"id": f"s{i + 1}", "path": result["path"], "subject": f"sub-{i:04d}", "session": None,
                      "age_years": float(rng.uniform(1, 11)), "group": str(int(rng.integers(1, 12))), "role": "",
                      "results": {"msma": result}, "thumbnail": False, "maps": {}})
    run = {"label": "msma", "path": "runs/x", "method": "msma", "config_name": "msma_quick", "config": {"a": 1},
           "preprocessing_fingerprint": "0" * 16, "fingerprint": "1" * 16, "training_subjects": 90,
           "reference_size": 30, "tpr": 0.95, "primary": "gmm", "scorers": ["gmm"], "thresholds": {"gmm": -1.6},
           "steps": 600, "seen_groups": [], "scored": n, "reused": 0}
    return {"neuro_ood_version": "0", "created": "now", "command": "neuro-ood report c --run r --out o",
            "cohort": {"name": "c", "kind": "bids", "n_inputs": n}, "unit": "scan", "group_by": "age",
            "runs": [run], "scans": scans, "failed": [], "metrics": {"msma": {"inliers": {"n": 30}, "groups": {}}},
            "roc": {"msma": {}}, "reference": {"msma": {"gmm": list(rng.normal(size=30))}}}


def test_html_of_a_thousand_scans_stays_small(tmp_path):
    from neuro_ood.pipelines import report_html
    from neuro_ood.pipelines.report import embed_thumbnails, select_thumbnails

    report = _fake_report(1000)
    selected, omitted = select_thumbnails(report["scans"], 12, [], report_html.MAX_THUMBNAILS)
    assert len(selected) == report_html.MAX_THUMBNAILS and len(omitted) == 334 - report_html.MAX_THUMBNAILS
    rng = np.random.default_rng(1)
    # noise planes: the worst case for PNG compression (a real thumbnail is about half as large)
    planes = {s["id"]: {"msma": {"image": [rng.random((90, 110))], "map": [rng.random((90, 110))]}} for s in selected}
    order = [s["id"] for s in selected]
    thumbnails, over_budget = embed_thumbnails(order, planes, [SimpleNamespace(label="msma")])
    assert len(thumbnails) + len(over_budget) == len(selected)
    assert sum(len(png) for images in thumbnails.values() for _, png in images) * 4 / 3 < report_html.THUMBNAIL_BUDGET
    report["thumbnails"] = {"order": order, "shown": len(thumbnails), "cap": report_html.MAX_THUMBNAILS,
                            "sample": 12, "omitted": [s["id"] for s in omitted] + over_budget}
    for scan in report["scans"]:
        scan["thumbnail"] = scan["id"] in thumbnails
    figures = {"dist:msma": report_html.distribution_figure("msma", ["gmm"], report["reference"]["msma"],
                                                            {"gmm": -1.6}, report["scans"], "age")}
    page = report_html.render_html(report, figures, thumbnails)
    (tmp_path / "report.html").write_text(page)
    assert len(page.encode()) < 20 * 1024 * 1024
    assert page.count("<img ") == len(thumbnails) + 1 <= report_html.MAX_THUMBNAILS + 1
    assert page.count("<tr>") < 50  # the 1,000 rows are data for the paginated table, not markup


def test_report_in_a_real_browser(reported, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    out, _ = reported
    n_rows = len(_csv(out / "scores.csv"))
    requests, errors = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((out / "report.html").as_uri())
        page.wait_for_load_state("load")
        page.select_option("#page-size", "0")  # all rows on one page
        assert page.locator("#scans tbody tr").count() == n_rows
        page.select_option("#page-size", "25")
        assert page.locator("#scans tbody tr").count() == min(25, n_rows)
        page.select_option("#page-size", "0")
        column = page.locator("#scans thead th").all_inner_texts().index("msma · gmm ★ score")

        def shown_scores():
            cells = page.locator(f"#scans tbody tr td:nth-child({column + 1})").all_inner_texts()
            return [float(c) for c in cells]

        page.click("#scans thead th[data-key='msma.gmm.score']")
        ascending = shown_scores()
        assert ascending == sorted(ascending) and len(ascending) == n_rows
        page.click("#scans thead th[data-key='msma.gmm.score']")
        assert shown_scores() == sorted(ascending, reverse=True)
        page.check("#flagged-only")
        n_flagged = len([r for r in _csv(out / "scores.csv") if "true" in (r["msma.flagged"], r["fanogan.flagged"])])
        assert page.locator("#scans tbody tr").count() == n_flagged
        page.uncheck("#flagged-only")
        page.fill("#filter", "sub-0001")
        assert page.locator("#scans tbody tr").count() == 1
        page.fill("#filter", "")
        n_images = page.evaluate("document.images.length")
        broken = page.evaluate("Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert n_images >= 2 and broken == 0
        assert page.locator("#failures tr").count() == len(BROKEN) + 1
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        page.screenshot(path="/tmp/neuro-ood-report.png", full_page=True)
        browser.close()
    assert errors == []
    assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests


def test_console_score_table_keeps_scan_names_and_large_scores_readable_at_80_columns():
    from rich.console import Console

    from neuro_ood.pipelines.score import ScanResult
    from neuro_ood.report import scores_table

    results = [ScanResult(path=f"/cohort/sub-{i:04d}/anat/sub-{i:04d}_ses-V01_T1w.nii.gz",
                          scores={"gmm": -4701.25, "maf": -5.93e33, "knn": -2.5, "voxel_tail": -8.4},
                          percentiles={"gmm": 0.0, "maf": 0.0, "knn": 3.0, "voxel_tail": 1.0},
                          flags={}, primary="gmm", flagged=True,
                          site={"site_score": -9.0, "site_percentile": 0.0, "site_shift": True})
               for i in range(2)]
    console = Console(width=80, record=True, color_system=None)
    console.print(scores_table(results))
    text = console.export_text()
    assert "sub-0001" in text and "-5.93e+33" in text and "-4701.25" in text
    assert "59300000" not in text                        # no thirty-digit fixed-point numbers
    assert "UNLIKE" in text and "ATYPICAL" in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_comparison_table_marks_seen_groups_only_where_a_run_saw_one():
    from neuro_ood.report import comparison_table

    def run(seen):
        values = {"auroc": 0.9}
        return {"inliers": {"n": 5}, "seen_groups": seen,
                "groups": {"1": {"n": 4, "scorers": {"gmm": values}}, "6": {"n": 4, "scorers": {"gmm": values}}}}

    plain = comparison_table({"runs": {"msma": run([]), "simple": run([])}})
    assert plain.caption is None
    with_classifier = comparison_table({"runs": {"msma": run([]), "resnet": run(["1"])}})
    assert "seen in training" in with_classifier.caption
    assert [cell for cell in with_classifier.columns[2].cells] == ["90.0", "90.0*"]
