"""Sharded scoring: ``report --shard I/N`` + ``merge`` gives the unsharded report's per-scan results;
shards of other runs or cohorts, duplicate and missing shards are refused with one error line."""

import csv
import json
import math
import shutil

import pytest

from neuro_ood.errors import ConfigError
from neuro_ood.pipelines.shards import Shard, identity, parse_shard, share
from tests.conftest import TINY_OVERRIDES, invoke, set_args

BROKEN = "sub-0003"


@pytest.fixture(scope="module")
def run(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-run") / "msma"
    result = invoke("train", "--config", "msma_quick", *set_args(TINY_OVERRIDES), "--dataset", "abcd",
                    "--data-dir", tiny_cohort, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def cohort(tiny_cohort, tmp_path_factory):
    """The tiny cohort with one unreadable scan, so that failures travel through the shards too."""
    root = tmp_path_factory.mktemp("shard-cohort") / "cohort"
    shutil.copytree(tiny_cohort, root)
    path = root / BROKEN / "anat" / f"{BROKEN}_T1w.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def sharded(run, cohort, tmp_path_factory):
    """The unsharded report, the two shards and their merge, each in its own folder."""
    root = tmp_path_factory.mktemp("sharded")
    results = {"full": invoke("report", cohort, "--run", run, "--out", root / "full")}
    for index in (2, 1):
        results[f"s{index}"] = invoke("report", cohort, "--run", run, "--out", root / f"s{index}",
                                      "--shard", f"{index}/2")
    results["merged"] = invoke("merge", root / "s1", root / "s2", "--out", root / "merged")
    return root, results


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) and value.strip() else None
    except ValueError:
        return None


def assert_same(a, b, where="") -> None:
    """``a == b`` up to float32 rounding of numbers (relative 1e-6), recursively.

    Scans are scored in groups, and a shard's groups hold other scans than the unsharded run's (as
    a resumed report's do): the float32 network and MAF and the float64 GMM then round their matrix
    products over a group differently (MAF by ~5e-8 relative, the GMM by ~1e-15), so scores agree
    to float32 precision but not to the last bit; everything else must be equal.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    elif _number(a) is not None and _number(b) is not None:
        assert math.isclose(_number(a), _number(b), rel_tol=1e-6, abs_tol=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_share_is_deterministic_and_a_partition_whatever_the_order():
    keys = [f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz" for i in range(11)]
    shuffled = keys[5:] + keys[:5][::-1]
    for count in (1, 2, 3, 11, 12):
        parts = [[keys[i] for i in share(keys, Shard(k, count))] for k in range(1, count + 1)]
        assert sorted(sum(parts, [])) == sorted(keys)
        again = [sorted(shuffled[i] for i in share(shuffled, Shard(k, count))) for k in range(1, count + 1)]
        assert [sorted(p) for p in parts] == again
    assert identity(keys) == identity(shuffled) != identity(keys[1:])


@pytest.mark.parametrize("text", ["0/2", "3/2", "2", "a/b", "1/0", "-1/2"])
def test_bad_shard_values_are_refused(text):
    with pytest.raises(ConfigError, match="--shard"):
        parse_shard(text)


def test_merged_shards_give_the_unsharded_results(sharded, cohort):
    root, results = sharded
    codes = {name: result.exit_code for name, result in results.items()}
    assert codes["full"] == codes["merged"] == 1 and sorted([codes["s1"], codes["s2"]]) == [0, 1], codes  # the broken scan
    full, merged = _csv(root / "full" / "scores.csv"), _csv(root / "merged" / "scores.csv")
    assert len(full) == 19
    assert_same(full, merged)
    first, second = (json.loads((root / f"s{i}" / "shard.json").read_text()) for i in (1, 2))
    assert not set(first["keys"]) & set(second["keys"])
    assert len(first["keys"]) + len(second["keys"]) == 20
    full_json, merged_json = (json.loads((root / d / "report.json").read_text()) for d in ("full", "merged"))
    for key in ("scans", "failed", "metrics", "roc", "reference", "cohort"):
        assert_same(merged_json[key], full_json[key], key)
    assert [f["path"] for f in merged_json["failed"]] == [f"{BROKEN}/anat/{BROKEN}_T1w.nii.gz"]
    assert merged_json["resume"]["msma"] == {"scored": 0, "reused": 19}
    assert (root / "merged" / "report.html").is_file()
    flagged = [s for s in full_json["scans"] if s["results"]["msma"]["flagged"]]
    assert sorted(s["maps"]["msma"] for s in merged_json["scans"] if s["maps"]) == \
        sorted(s["maps"]["msma"] for s in flagged)
    for files in (s["maps"].get("msma", []) for s in merged_json["scans"]):
        assert all((root / "merged" / f).is_file() for f in files)


def _one_error_line(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_shards_of_different_runs_are_refused(sharded, run, cohort, tmp_path):
    root, _ = sharded
    other = tmp_path / "other-run"
    shutil.copytree(run, other)
    reference = json.loads((other / "reference.json").read_text())
    reference["tpr"] = 0.9
    (other / "reference.json").write_text(json.dumps(reference))
    result = invoke("report", cohort, "--run", other, "--out", tmp_path / "o2", "--shard", "2/2")
    assert (tmp_path / "o2" / "shard.json").is_file(), result.output
    _one_error_line(invoke("merge", root / "s1", tmp_path / "o2", "--out", tmp_path / "m"), "different runs")


def test_missing_duplicate_and_unfinished_shards_are_refused(sharded, tmp_path):
    root, _ = sharded
    _one_error_line(invoke("merge", root / "s1", "--out", tmp_path / "m"), "shard 2/2 missing")
    shutil.copytree(root / "s1", tmp_path / "s1-copy")
    _one_error_line(invoke("merge", root / "s1", tmp_path / "s1-copy", "--out", tmp_path / "m"),
                    "shard 1/2 given twice")
    _one_error_line(invoke("merge", root / "s1", root / "full", "--out", tmp_path / "m"), "no shard.json")
    _one_error_line(invoke("report", root / "nowhere", "--run", root, "--out", tmp_path / "x", "--shard", "3/2"),
                    "--shard 3/2")
    assert not (tmp_path / "m").exists()


def test_a_shard_folder_is_not_reused_for_another_shard(sharded, run, cohort):
    root, _ = sharded
    _one_error_line(invoke("report", cohort, "--run", run, "--out", root / "s1", "--shard", "2/2"),
                    "holds shard 1/2")


def test_score_shards_cover_the_scans_once(run, cohort):
    scans = sorted(str(p) for p in cohort.glob("sub-*/anat/*_T1w.nii.gz"))[:7]
    full = json.loads(invoke("score", *scans, "--run", run, "--json").stdout)
    parts = [json.loads(invoke("score", *scans[::-1], "--run", run, "--json", "--shard", f"{i}/3").stdout)
             for i in (1, 2, 3)]
    by_path = {s["path"]: s for s in full["scans"]}
    shown = [s for part in parts for s in part["scans"]]
    assert sorted(s["path"] for s in shown) == sorted(by_path)
    for scan in shown:
        assert_same(scan, by_path[scan["path"]])
    assert {part["shard"]["cohort"] for part in parts} == {identity(scans)}
    assert [part["shard"]["index"] for part in parts] == [1, 2, 3]
