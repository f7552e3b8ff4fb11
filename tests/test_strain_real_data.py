"""scripts/strain_real_data.py: converters on tiny fake inputs (ACDC h5, CAMUS npy, Sunnybrook contours with a fake
DICOM reader), the statistics helpers on synthetic rows, and one quick end-to-end run per real dataset (skipped
without ../shared/data)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import stats

from conftest import load_repo_script, ring_label, shared_data

TOOLS = str(Path(__file__).resolve().parents[1] / "scripts")
if TOOLS not in sys.path:  # as running a tool does: its helpers (_bundle.py, _prep_common.py) import from there
    sys.path.append(TOOLS)

real = load_repo_script("strain_real_data")


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


# ------------------------------------------------------------------------------------------------- converters
def _fake_acdc(root: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    root.mkdir()
    ed = np.stack([ring_label(24, (12, 11), 6)[:, :20] for _ in range(3)])  # (z, y, x) = (3, 24, 20)
    es = np.stack([ring_label(24, (12, 11), 4)[:, :20] for _ in range(3)])
    ed[2] = np.where(ed[2] == 2, 0, ed[2])  # a slice without myocardium
    ed[0, 0, :3] = 1  # an RV voxel
    for frame, label in ((1, ed), (9, es)):
        with h5py.File(root / f"patient061_frame{frame:02d}.h5", "w") as handle:
            handle["image"] = label.astype(np.float32) / 3 + np.arange(20, dtype=np.float32)[None, None] / 100
            handle["label"] = label
    (root / "pairs.csv").write_text("patient,group,ed_frame,es_frame,ed_file,es_file,shape_zyx\n"
                                    "patient061,NOR,1,9,patient061_frame01.h5,patient061_frame09.h5,3x24x20\n")
    return ed, es


def test_convert_acdc_layout(tmp_path: Path) -> None:
    """h5 (z, y, x) -> NIfTI (x, y, z) with the bundle's naming, identity affine, group and the volume EF."""
    ed, es = _fake_acdc(tmp_path / "acdc")
    out = tmp_path / "cases"
    out.mkdir()
    meta = real.convert_acdc(tmp_path / "acdc", out)
    assert sorted(p.name for p in out.iterdir()) == [f"patient061_{n}.nii.gz" for n in ("ED", "ED_gt", "ES", "ES_gt")]
    image = nib.load(str(out / "patient061_ED_gt.nii.gz"))
    assert image.shape == (20, 24, 3)
    np.testing.assert_array_equal(image.affine, np.eye(4))
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.transpose(ed, (2, 1, 0)))
    frame = np.asarray(nib.load(str(out / "patient061_ED.nii.gz")).dataobj)
    assert frame[5, 0, 0] == pytest.approx(ed[0, 0, 5] / 3 + 0.05)  # x is the h5's last axis
    assert meta[0] == {"case": "patient061", "group": "NOR", "ed_frame": 1, "es_frame": 9, "shape_xyz": "20x24x3",
                       "myo_slices": 2, "ef_volume": pytest.approx(1 - (es == 3).sum() / (ed == 3).sum()),
                       "label_radial_engineering": pytest.approx(meta[0]["label_radial_engineering"]),
                       "label_circumferential_engineering": pytest.approx(meta[0]["label_circumferential_engineering"])}
    assert meta[0]["label_circumferential_engineering"] < 0
    assert real.convert_acdc(tmp_path / "acdc", out, cases=["patient999"]) == []


def test_equivalent_circle_strain_of_rings() -> None:
    """Discs of radius 10 (cavity) in rings to 14 at ED, 6 in 12 at ES: thickness 4 -> 6, mid-wall 12 -> 9."""
    x, y = np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
    r = np.hypot(x - 40, y - 40)

    def ring(inner: float, outer: float) -> np.ndarray:
        return np.where(r < inner, 3, np.where(r < outer, 2, 0))[..., None].repeat(2, axis=-1)

    ed, es = ring(20, 28), ring(12, 24)
    es[..., 1] = 0  # a slice without structures at ES is skipped
    values = real.equivalent_circle_strain(ed, es, 2, 3)
    assert values["label_radial_engineering"] == pytest.approx(12 / 8 - 1, abs=0.03)
    assert values["label_circumferential_engineering"] == pytest.approx(18 / 24 - 1, abs=0.03)
    assert np.isnan(real.equivalent_circle_strain(ed, np.zeros_like(es), 2, 3)["label_radial_engineering"])


def test_note_kinds_counts_per_kind() -> None:
    rows = [{"notes": "slice 0: no RV contact; AHA origin from slice 2"}, {"notes": "slice 7: no RV contact"}, {}]
    lines = real.note_kinds(rows)
    assert "- slice k: no RV contact (2 / 2)" in lines and "- AHA origin from slice k (1 / 1)" in lines
    assert real.note_kinds([{}]) == []


def test_largest_components_fills_fragments_from_neighbours() -> None:
    label = np.zeros((12, 12), np.uint8)
    label[1:11, 1:11] = 2
    label[4:8, 4:8] = 1
    label[0, 0] = 1  # a fragment of class 1 in the background corner
    label[2, 6] = 1  # a fragment inside the myocardium
    cleaned, changed = real.largest_components(label, (1, 2, 3))
    assert changed == 2
    assert cleaned[0, 0] == 0 and cleaned[2, 6] == 2  # the nearest kept label: no hole opens
    assert (cleaned == 1).sum() == 16
    same, none = real.largest_components(cleaned, (1, 2, 3))
    assert none == 0 and same is cleaned


def test_convert_camus_layout_and_cleaning(tmp_path: Path) -> None:
    root = tmp_path / "camus"
    root.mkdir()
    ed = np.zeros((16, 16))
    ed[3:13, 3:13] = 2
    ed[5:11, 5:11] = 1
    ed[5, 5] = 0.6  # a linear-interpolation border value: rint -> 1
    ed[0, 15] = 0.7  # a thin rounding fragment of the LV class
    es = ed.copy()
    es[5:11, 5:8] = 2
    for name, array in (("ED", ed * 0.1), ("ED_gt", ed), ("ES", es * 0.1), ("ES_gt", es)):
        np.save(root / f"patient0001_2CH_{name}.npy", array)
    (root / "pairs.csv").write_text("patient,view,ed_image,ed_gt,es_image,es_gt\n"
                                    "patient0001,2CH,patient0001_2CH_ED.npy,patient0001_2CH_ED_gt.npy,"
                                    "patient0001_2CH_ES.npy,patient0001_2CH_ES_gt.npy\n")
    out = tmp_path / "cases"
    out.mkdir()
    meta = real.convert_camus(root, out)
    label = np.asarray(nib.load(str(out / "patient0001_2CH_ED_gt.nii.gz")).dataobj)
    assert label.shape == (16, 16) and label.dtype == np.uint8
    assert label[5, 5] == 1 and label[0, 15] == 0
    assert np.asarray(nib.load(str(out / "patient0001_2CH_ES.nii.gz")).dataobj).dtype == np.float32
    assert meta[0]["case"] == "patient0001_2CH" and meta[0]["view"] == "2CH"
    assert meta[0]["fragment_pixels"] == 2  # the fragment in both ED and ES labels
    assert meta[0]["fac_labels"] == pytest.approx(0.5) and "gls_labels_midwall" in meta[0]
    raw = tmp_path / "raw"
    raw.mkdir()
    real.convert_camus(root, raw, keep_largest=False)
    assert np.asarray(nib.load(str(raw / "patient0001_2CH_ED_gt.nii.gz")).dataobj)[0, 15] == 1


def test_contour_labels_cavity_and_myocardium() -> None:
    """i-contour -> LV cavity 3, o-contour minus i-contour -> myocardium 2, pixel centres inside (x = column)."""
    icontour = np.array([[4.5, 3.5], [8.5, 3.5], [8.5, 6.5], [4.5, 6.5]])  # columns 5-8, rows 4-6
    ocontour = np.array([[2.5, 1.5], [10.5, 1.5], [10.5, 8.5], [2.5, 8.5]])  # columns 3-10, rows 2-8
    label = real.contour_labels(icontour, ocontour, (12, 14))
    assert (label == 3).sum() == 4 * 3 and label[4:7, 5:9].min() == 3
    assert (label == 2).sum() == 8 * 7 - 12 and label[2, 3] == 2 and label[1, 3] == 0
    assert set(np.unique(real.contour_labels(icontour, None, (12, 14)))) == {0, 3}


def _fake_sunnybrook(root: Path) -> None:
    (root / "contours").mkdir(parents=True)
    np.savetxt(root / "contours" / "ed_i.txt", [[10, 10], [20, 10], [20, 20], [10, 20]])
    np.savetxt(root / "contours" / "ed_o.txt", [[6, 6], [24, 6], [24, 24], [6, 24]])
    np.savetxt(root / "contours" / "es_i.txt", [[12, 12], [18, 12], [18, 18], [12, 18]])
    (root / "pairs.csv").write_text(
        "patient_id,original_id,slice_location,ed_dicom,ed_trigger_ms,ed_icontour,ed_ocontour,es_dicom,es_trigger_ms,"
        "es_icontour,es_ocontour,pixel_spacing_mm,slice_thickness_mm,ed_lv_area_px,es_lv_area_px\n"
        "SCD0000101,SC-HF-I-1,-30.5,dicoms/P/4.dcm,700,contours/ed_i.txt,contours/ed_o.txt,dicoms/P/2.dcm,300,"
        "contours/es_i.txt,,1.25 1.25,10,100,36\n")
    frames = " ".join(f"cine/P/{i}.dcm" for i in range(5))
    (root / "cines.csv").write_text("patient_id,slice_location,n_frames,frames,trigger_ms,ed_index,es_index,ed_dicom,"
                                    f"es_dicom\nSCD0000101,-30.5,5,{frames},10 110 210 310 410,4,2,dicoms/P/4.dcm,"
                                    "dicoms/P/2.dcm\n")


def test_convert_sunnybrook_cine_datalist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-frame 2D files with the DICOM spacing, ED labels from i/o contours, ES cavity, a datalist of the cine."""
    root = tmp_path / "sunnybrook"
    _fake_sunnybrook(root)
    read = []

    def fake_dicom(path: Path):
        read.append(Path(path).name)
        ramp = np.arange(30, dtype=np.float32)[None, :] * 0.01  # not constant: the strain engine refuses a flat frame
        return np.full((32, 30), float(Path(path).stem), np.float32) + ramp, np.diag([1.25, 1.5, 8.0, 1.0])

    monkeypatch.setattr(real, "read_dicom", fake_dicom)
    out = tmp_path / "cases"
    out.mkdir()
    meta = real.convert_sunnybrook(root, out)
    assert read == [f"{i}.dcm" for i in range(5)]
    items = json.loads((out / "datalist.json").read_text())["testing"]
    assert len(items) == 1 and items[0]["case"] == "SCD0000101_zm0030.50" == meta[0]["case"]
    assert items[0]["ed_index"] == 4 and items[0]["es_index"] == 2
    assert items[0]["trigger_ms"] == [10, 110, 210, 310, 410]
    frame = nib.load(items[0]["cine"][3])
    assert frame.shape == (32, 30) and np.asarray(frame.dataobj)[0, 0] == 3
    assert frame.header.get_zooms()[:2] == (1.25, 1.5)
    ed = np.asarray(nib.load(items[0]["moving_label"]).dataobj)
    assert (ed == 3).sum() == 100 and (ed == 2).sum() == 18 * 18 - 100 and ed[12, 8] == 2  # row 12, column 8
    es = np.asarray(nib.load(meta[0]["es_gt"]).dataobj)
    assert set(np.unique(es)) == {0, 3} and (es == 3).sum() == 36
    assert meta[0]["fac_labels"] == pytest.approx(0.64) and meta[0]["has_epicardium"]
    assert meta[0]["epicardium_cover"] == 1.0 and meta[0]["epicardium_ok"]
    # the strain engine reads the datalist as a 5-frame one-slice cine
    from scripts.strain_io import collect_cases, load_case

    case = load_case(collect_cases(None, out / "datalist.json")[0])
    assert case.frames.shape == (5, 1, 32, 30) and case.ed_index == 4 and case.spacing == (1.25, 1.5)


def test_convert_sunnybrook_flags_an_epicardium_off_the_cavity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An o-contour that does not enclose the i-contour (as SC-HF-I-6's, shifted) is flagged: no usable myocardium."""
    root = tmp_path / "sunnybrook"
    _fake_sunnybrook(root)
    np.savetxt(root / "contours" / "ed_o.txt", [[6, 14], [24, 14], [24, 32], [6, 32]])  # shifted 8 rows down
    monkeypatch.setattr(real, "read_dicom", lambda path: (np.zeros((40, 40), np.float32), np.eye(4)))
    out = tmp_path / "cases"
    out.mkdir()
    (meta,) = real.convert_sunnybrook(root, out)
    assert meta["epicardium_cover"] == pytest.approx(0.6) and not meta["epicardium_ok"]


def test_read_dicom_affine_of_a_sunnybrook_slice() -> None:
    """The RAS affine of a real DICOM slice: array axis 0 = rows, axis 1 = columns, the DICOM pixel spacing; the
    bundle then takes anterior / patient right from it (an oblique affine)."""
    root = shared_data("sunnybrook")
    pytest.importorskip("itk")
    row = next(csv.DictReader(open(root / "cines.csv")))
    array, affine = real.read_dicom(root / row["ed_dicom"])
    assert array.shape == (256, 256)
    spacing = real.affine_spacing(affine)
    assert spacing[0] == pytest.approx(spacing[1]) and 1.2 < spacing[0] < 1.4
    assert abs(np.dot(affine[:3, 0], affine[:3, 1])) < 1e-6  # orthogonal in-plane axes
    from scripts import myocardium

    notes: list = []
    anterior, right, source = myocardium._orientation(affine, (0.0, -1.0), (-1.0, 0.0), notes)
    assert notes == [] and np.linalg.norm(anterior) == pytest.approx(1.0)
    img = nib.Nifti1Image(array, affine)
    assert img.header.get_zooms()[:2] == pytest.approx(spacing)


# ------------------------------------------------------------------------------------------------- statistics
def test_group_table_mean_sd_per_group() -> None:
    rows = [{"group": "NOR", "x": 0.2}, {"group": "NOR", "x": 0.3}, {"group": "DCM", "x": "0.1"},
            {"group": "DCM", "x": ""}]
    lines = real.group_table(rows, "group", ("NOR", "MINF", "DCM"), {"x": "radial"})
    assert lines[0] == "| group | n | radial |"
    assert lines[2] == f"| NOR | 2 | 25.0 ± {100 * np.std([0.2, 0.3], ddof=1):.1f} |"
    assert lines[3] == "| DCM | 2 | 10.0 ± 0.0 |"  # the empty value is skipped; one value: SD 0
    assert lines[4].startswith("| all | 4 | 20.0 ± 10.0")
    assert len(lines) == 5  # no MINF rows: no line
    assert real.mean_sd([np.nan]) == (pytest.approx(np.nan, nan_ok=True), pytest.approx(np.nan, nan_ok=True), 0)


def test_correlation_and_paired_comparison() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=30)
    y = -2 * x + rng.normal(scale=0.5, size=30)
    y[3] = np.nan
    c = real.correlation(x, y)
    ok = np.isfinite(y)
    assert c["n"] == 29
    assert c["pearson_r"] == pytest.approx(stats.pearsonr(x[ok], y[ok])[0]) and c["pearson_r"] < -0.9
    assert c["spearman_p"] < 1e-6 and c["pearson_p"] < 1e-6
    assert np.isnan(real.correlation([1, 2], [3, 4])["pearson_r"])
    a, b = x + 0.1 + rng.normal(scale=0.01, size=30), x
    test = real.paired_comparison(a, b)
    assert test["mean_diff"] == pytest.approx(0.1, abs=0.01) and test["p"] < 1e-6
    assert test["t"] == pytest.approx(stats.ttest_rel(a, b).statistic)
    lines = real.correlation_lines([{"s": v, "ef": w} for v, w in zip(x, y)], [("s", "ef", "s vs EF")])
    assert lines[2].startswith(f"| s vs EF | 29 | {c['pearson_r']:.2f} |")


def test_fallback_slices_from_notes() -> None:
    notes = ("base = the last slices (larger LV cavity); slice 0: no RV contact; AHA origin from slice 2; "
             "slice 7: no RV contact; AHA origin from slice 6; slice 3: the septum lies along the anterior direction; "
             "anterior insertion ambiguous")
    assert real.fallback_slices(notes, 9) == {"aha_fallback_slices": 2, "aha_ambiguous_slices": 1}
    whole = "no slice has RV contact: AHA origin from the image axes (septum along (0.0, 1.0))"
    assert real.fallback_slices(whole, 1) == {"aha_fallback_slices": 1, "aha_ambiguous_slices": 0}
    assert real.fallback_slices("", 4)["aha_fallback_slices"] == 0


def test_missing_data_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert real.main(["--dataset", "acdc", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- real data, end to end
def _run(dataset: str, tmp_path: Path, *args: str) -> list[dict]:
    shared_data(dataset)
    out = tmp_path / "out"
    code = real.main(["--dataset", dataset, "--out", str(out), "--no-figures", *args])
    assert code == 0, (out / "report.md").read_text() if (out / "report.md").exists() else code
    assert (out / "report.md").read_text().startswith(f"# Strain workflow on real data: {dataset}")
    return _read_csv(out / "cases.csv")


def test_real_acdc_one_patient(tmp_path: Path, one_thread) -> None:
    """A NOR patient: radial strain > 0 and circumferential < 0 at ES; tracking beats the undeformed labels."""
    (row,) = _run("acdc", tmp_path, "--cases", "patient061")
    assert row["status"] == "ok" and row["group"] == "NOR"
    assert float(row["global_radial_green"]) > 0.05 and float(row["global_circumferential_green"]) < -0.05
    assert float(row["ef_labels"]) == pytest.approx(float(row["ef_volume"]), abs=1e-4)
    assert float(row["dice_es_lv"]) > float(row["dice_es_lv_undeformed"])


def test_real_camus_one_patient(tmp_path: Path, one_thread) -> None:
    """Both views of one patient: mid-wall GLS and pixel-wise longitudinal strain negative at ES."""
    rows = _run("camus", tmp_path, "--cases", "patient0027")
    assert [r["view"] for r in rows] == ["2CH", "4CH"]
    for row in rows:
        assert row["status"] == "ok" and row["echo_view"] == row["view"]
        assert float(row["gls_midwall_engineering"]) < 0 and float(row["global_longitudinal_green"]) < 0
        assert 0 < float(row["fac_labels"]) < 1 and float(row["gls_labels_midwall"]) < 0


def test_real_sunnybrook_one_slice(tmp_path: Path, one_thread) -> None:
    """One cine slice, direct and sequential tracking: LV Dice at ES registered > undeformed; radial > 0 and
    circumferential < 0 at ES; the frame-to-frame chain round the cycle drifts more than the network's ED-to-ED
    registration, and by less than 10 mm."""
    (row,) = _run("sunnybrook", tmp_path, "--max-cases", "1", "--tracking", "direct", "sequential")
    for mode in ("direct", "sequential"):
        assert row[f"{mode}_status"] == "ok"
        assert float(row[f"{mode}_dice_es_lv"]) > float(row["dice_es_lv_undeformed"])
        assert float(row[f"{mode}_global_radial_green"]) > 0 > float(row[f"{mode}_global_circumferential_green"])
    assert 0 < float(row["direct_drift_mm"]) < float(row["sequential_drift_mm"]) < 10
    assert 0 < float(row["sequential_es_field_vs_direct_mm"]) < 10  # reads the workflow's cine displacement file
    assert float(row["drift_corrected_drift_mm"]) == 0
