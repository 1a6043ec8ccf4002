import json

import pytest

from neuro_ood.config import DataConfig
from neuro_ood.data.cohort import (age_group, load_cohort, read_bids_cohort, select_inliers,
                                   split_subjects)
from neuro_ood.errors import CohortError
from tests.conftest import shared_data


def touch_scan(root, rel):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_bids_ages_from_participants_sessions_and_scans_with_units(tmp_path):
    touch_scan(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz")
    touch_scan(tmp_path, "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz")
    touch_scan(tmp_path, "sub-03/ses-A/anat/sub-03_ses-A_T1w.nii")
    (tmp_path / "participants.tsv").write_text("participant_id\tinterview_age\nsub-01\t120\nsub-02\t108\n")
    (tmp_path / "sub-02" / "sub-02_sessions.tsv").write_text("session_id\tage\nses-1\t52\n")
    (tmp_path / "sub-02" / "sub-02_sessions.json").write_text(json.dumps({"age": {"Units": "weeks"}}))
    (tmp_path / "sub-03" / "ses-A" / "sub-03_ses-A_scans.tsv").write_text(
        "filename\tage\nanat/sub-03_ses-A_T1w.nii\t24\n")
    (tmp_path / "sub-03" / "ses-A" / "sub-03_ses-A_scans.json").write_text(json.dumps({"age": {"Units": "months"}}))
    scans = {s.subject: s for s in read_bids_cohort(tmp_path, DataConfig())}
    assert scans["sub-01"].age_years == pytest.approx(10.0)          # interview_age: months
    assert scans["sub-02"].age_years == pytest.approx(52 * 7 / 365.25)  # session overrides participant
    assert scans["sub-02"].session == "ses-1"
    assert scans["sub-03"].age_years == pytest.approx(2.0)


def test_table_cohort_relative_paths_and_subjects(tmp_path):
    touch_scan(tmp_path, "img/a.nii.gz")
    (tmp_path / "scans.csv").write_text("subject,path,age\nS1,img/a.nii.gz,9.5\nS2,/abs/b.nii,\n")
    scans = load_cohort(tmp_path / "scans.csv", DataConfig())
    assert scans[0].path == tmp_path / "img/a.nii.gz" and scans[0].age_years == 9.5
    assert scans[1].subject == "S2" and scans[1].age_years is None


def test_missing_cohort_and_unit_errors(tmp_path):
    with pytest.raises(CohortError, match="no sub-"):
        read_bids_cohort(tmp_path, DataConfig())
    (tmp_path / "t.tsv").write_text("path\tage\na.nii\t3\n")
    with pytest.raises(CohortError, match="age unit"):
        load_cohort(tmp_path / "t.tsv", DataConfig(age_unit="fortnights"))


def test_subject_split_is_disjoint_and_reproducible(tiny_cohort):
    cfg = DataConfig()
    inliers = select_inliers(load_cohort(tiny_cohort, cfg), cfg)
    assert len(inliers) == 12 and all(9 <= s.age_years <= 11 for s in inliers)
    train, held = split_subjects(inliers, 0.25, seed=0)
    assert not set(train) & set(held) and len(train) + len(held) == 12 and len(held) == 3
    assert (train, held) == split_subjects(inliers, 0.25, seed=0)


def test_age_groups_round_to_whole_years():
    assert [age_group(a) for a in (0.9, 1.4, 23 / 12, 6.0)] == ["1", "1", "2", "6"]
    assert [age_group(a) for a in (2.5, 3.5, 30 / 12, 42 / 12)] == ["3", "4", "3", "4"]  # half years round up


def test_real_paediatric_bids_ages_from_scans_tsv():
    root = shared_data("paediatric_t1w_bids")
    scans = {s.subject: s for s in read_bids_cohort(root, DataConfig())}
    assert scans["sub-0002"].age_years == pytest.approx(23 / 12)   # 23 months per the JSON sidecar
    assert scans["sub-0008"].age_years == pytest.approx(1 / 12)
    # sub-0005's scans.tsv names another subject's file: no age rather than a wrong one.
    assert scans["sub-0005"].age_years is None
