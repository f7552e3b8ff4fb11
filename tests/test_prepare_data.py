"""scripts/prepare_acdc.py and scripts/prepare_camus.py on tiny synthetic files in the official layouts (and on
../shared/data when it is there): outputs, crop, resize, spacing, split, and bad input reported and skipped."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import load_repo_script  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOOLS = str(REPO / "scripts")
if TOOLS not in sys.path:  # as running a tool does: its helpers (_bundle.py, _prep_common.py) import from there
    sys.path.append(TOOLS)


_load = load_repo_script


prepare_acdc = _load("prepare_acdc")
prepare_camus = _load("prepare_camus")
common = sys.modules["_prep_common"]


def _ring_volume(shape_xy: tuple[int, int], centre: tuple[int, int], depth: int, radius: float) -> np.ndarray:
    """ACDC-like labels: LV cavity (3) inside a myocardial ring (2), RV blob (1), the same on every slice."""
    x, y = np.meshgrid(np.arange(shape_xy[0]), np.arange(shape_xy[1]), indexing="ij")
    distance = np.hypot(x - centre[0], y - centre[1])
    label = np.zeros(shape_xy, np.uint8)
    label[distance < radius + 3] = 2
    label[distance < radius] = 3
    label[np.hypot(x - centre[0], y - centre[1] - radius - 8) < 3] = 1
    return np.repeat(label[..., None], depth, axis=2)


def _save(array: np.ndarray, path: Path, zooms=(1.5, 1.25, 8.0)) -> None:
    image = nib.Nifti1Image(array, np.diag([*zooms[: array.ndim], 1.0][:3] + [1.0]) if array.ndim == 3 else np.diag([*zooms[:2], 1.0, 1.0]))
    image.header.set_zooms(zooms[: array.ndim])
    nib.save(image, str(path))


def _acdc_patient(root: Path, name: str, ed: int, es: int, shape=(60, 50, 3), centre=(30, 25), skip: str | None = None) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180\nNbFrame: 20\nWeight: 70\n")
    for frame, radius in ((ed, 8.0), (es, 6.0)):
        label = _ring_volume(shape[:2], centre, shape[2], radius)
        image = label.astype(np.float32) * 100 + 5
        for suffix, array in (("", image), ("_gt", label)):
            filename = f"{name}_frame{frame:02d}{suffix}.nii.gz"
            if filename != skip:
                _save(array, folder / filename)


def _read_datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def test_crop_or_pad_centres_and_pads_without_wrap():
    array = np.arange(300 * 300, dtype=np.float32).reshape(300, 300)
    crop = common.crop_or_pad(array, (280, 290), 128)
    assert crop.shape == (128, 128)
    assert crop[64, 64] == array[280, 290]  # the centre lands in the middle (no uint8 wrap of 280 / 290)
    assert crop[0, 0] == array[280 - 64, 290 - 64]
    assert np.all(crop[64 + 20 :, :] == 0)  # rows past the image edge are zero padding
    assert np.all(crop[:, 64 + 10 :] == 0)


def test_acdc_official_layout(tmp_path, capsys):
    root = tmp_path / "training"
    for i in range(1, 5):
        _acdc_patient(root, f"patient{i:03d}", ed=1, es=7 + i)
    _acdc_patient(root, "patient005", ed=1, es=9, skip="patient005_frame09_gt.nii.gz")  # missing ES label
    (root / "notes").mkdir()  # not a patient folder
    out = tmp_path / "out"
    assert prepare_acdc.main(["--source", str(root), "--out", str(out), "--val-patients", "1", "--test-patients", "1"]) == 0
    printed = capsys.readouterr()
    assert "patient005_frame09_gt.nii.gz" in printed.out + printed.err
    assert "notes" in printed.out + printed.err
    datalist = _read_datalist(out)
    counts = {s: len(datalist[s]) for s in ("training", "validation", "testing")}
    assert counts == {"training": 6, "validation": 3, "testing": 3}  # 4 patients x 3 slices, split by patient
    patients = {s: {item["patient"] for item in datalist[s]} for s in counts}
    assert not (patients["training"] & patients["validation"]) and not (patients["training"] & patients["testing"])
    assert len(datalist["metadata"]["skipped"]) == 2
    item = datalist["training"][0]
    image = nib.load(str(out / item["moving"]))
    label = np.asarray(nib.load(str(out / item["moving_label"])).dataobj)
    assert image.shape == (128, 128)
    assert np.allclose(image.header.get_zooms()[:2], (1.5, 1.25))  # native spacing carried
    assert datalist["metadata"]["patients"]["patient001"]["spacing_mm"] == [1.5, 1.25]
    rows, cols = np.nonzero(label == 2)
    assert abs(rows.mean() - 64) <= 1 and abs(cols.mean() - 64) <= 1  # crop centred on the ED myocardium
    es_label = np.asarray(nib.load(str(out / item["fixed_label"])).dataobj)
    assert (es_label == 3).sum() < (label == 3).sum()  # ES is the ES frame (smaller cavity)
    assert set(np.unique(label)) == {0, 1, 2, 3}


def test_acdc_large_image_centroid_is_not_wrapped(tmp_path):
    root = tmp_path / "acdc"
    _acdc_patient(root, "patient001", ed=1, es=5, shape=(300, 290, 1), centre=(270, 260))
    _acdc_patient(root, "patient002", ed=1, es=5)
    out = tmp_path / "out"
    assert prepare_acdc.main(["--source", str(root), "--out", str(out), "--val-patients", "1", "--test-patients", "0"]) == 0
    meta = _read_datalist(out)["metadata"]["patients"]["patient001"]
    assert meta["crop_centre_xy"] == [270, 260]
    label = np.asarray(nib.load(str(out / "patient001_slice00_ED_gt.nii.gz")).dataobj)
    rows, cols = np.nonzero(label == 2)
    assert abs(rows.mean() - 64) <= 1 and abs(cols.mean() - 64) <= 1


def _h5_patient(root: Path, name: str, frames=(1, 10), shape_zyx=(4, 70, 80), centre_yx=(30, 45)):
    h5py = pytest.importorskip("h5py")
    label_xy = _ring_volume((shape_zyx[2], shape_zyx[1]), (centre_yx[1], centre_yx[0]), shape_zyx[0], 7.0)  # (x, y, z)
    label = label_xy.transpose(2, 1, 0)  # (z, y, x) as the HDF5 files
    rng = np.random.default_rng(0)
    for frame in frames:
        with h5py.File(root / f"{name}_frame{frame:02d}.h5", "w") as handle:
            handle["image"] = (label * 0.3 + rng.random(label.shape) * 0.05).astype(np.float32)
            handle["label"] = label


def test_acdc_hdf5_layout_axes_and_unknown_spacing(tmp_path):
    root = tmp_path / "acdc_h5"
    root.mkdir()
    for i in range(1, 4):
        _h5_patient(root, f"patient{i:03d}")
    (root / "patient004_frame01.h5").write_bytes(b"not hdf5")  # only one frame and unreadable
    out = tmp_path / "out"
    assert prepare_acdc.main(["--source", str(root), "--out", str(out), "--val-patients", "1", "--test-patients", "1"]) == 0
    datalist = _read_datalist(out)
    assert any("patient004" in s for s in datalist["metadata"]["skipped"])
    assert datalist["metadata"]["patients"]["patient001"]["spacing_mm"] is None
    assert "unknown" in datalist["metadata"]["spacing"]
    import h5py

    with h5py.File(root / "patient001_frame01.h5") as handle:
        source_label = handle["label"][2].T  # slice z=2, (y, x) -> (x, y)
    written = np.asarray(nib.load(str(out / "patient001_slice02_ED_gt.nii.gz")).dataobj)
    centre = datalist["metadata"]["patients"]["patient001"]["crop_centre_xy"]
    assert np.array_equal(written, common.crop_or_pad(source_label, centre, 128))
    assert centre == [45, 30]  # (x, y) of the ring centre: the (z, y, x) arrays were transposed


def test_split_folds_are_a_cross_validation():
    """Folds 0..4 of 50 patients in 5 groups test disjoint, group-stratified blocks that cover every patient; the
    validation block follows the test block and never overlaps it; fold 0 is the plain split."""
    patients = [f"p{i:02d}" for i in range(50)]
    groups = {p: f"g{i // 10}" for i, p in enumerate(patients)}
    plain = common.split_patients(patients, groups, 5, 10, seed=3)
    assert common.split_patients(patients, groups, 5, 10, seed=3, fold=0) == plain
    tested = []
    for fold in range(5):
        sections = common.split_patients(patients, groups, 5, 10, seed=3, fold=fold)
        test = [p for p, s in sections.items() if s == "testing"]
        val = [p for p, s in sections.items() if s == "validation"]
        assert len(test) == 10 and len(val) == 5 and len(sections) == 50
        assert sorted(groups[p] for p in test) == [f"g{g}" for g in range(5) for _ in range(2)]
        assert sorted(groups[p] for p in val) == [f"g{g}" for g in range(5)]
        tested += test
    assert sorted(tested) == patients
    with pytest.raises(SystemExit, match="fold 5 does not exist.*folds 0-4"):
        common.split_patients(patients, groups, 5, 10, seed=3, fold=5)


def test_acdc_fold_option_moves_the_test_patients(tmp_path):
    root = tmp_path / "acdc"
    for i in range(1, 7):
        _acdc_patient(root, f"patient{i:03d}", 1, 8)
    tests = []
    for fold in (0, 1, 2):
        out = tmp_path / f"out{fold}"
        assert prepare_acdc.main(["--source", str(root), "--out", str(out), "--val-patients", "1",
                                  "--test-patients", "2", "--fold", str(fold)]) == 0
        metadata = _read_datalist(out)["metadata"]
        assert metadata["fold"] == fold
        tests.append(metadata["split"]["testing"])
    assert sorted(sum(tests, [])) == [f"patient{i:03d}" for i in range(1, 7)]
    with pytest.raises(SystemExit, match="fold 3 does not exist"):
        prepare_acdc.main(["--source", str(root), "--out", str(tmp_path / "bad"), "--val-patients", "1",
                           "--test-patients", "2", "--fold", "3"])


def test_acdc_folder_in_no_layout_and_nothing_usable(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "readme.txt").write_text("x")
    with pytest.raises(SystemExit, match="random"):
        prepare_acdc.main(["--source", str(tmp_path / "random"), "--out", str(tmp_path / "out")])
    broken = tmp_path / "broken"
    _acdc_patient(broken, "patient001", ed=1, es=5, skip="patient001_frame05.nii.gz")
    assert prepare_acdc.main(["--source", str(broken), "--out", str(tmp_path / "out2"), "--val-patients", "0", "--test-patients", "0"]) == 1


def test_acdc_unreadable_nifti_is_named(tmp_path, capsys):
    root = tmp_path / "acdc"
    for i in (1, 2, 3):
        _acdc_patient(root, f"patient{i:03d}", ed=1, es=5)
    (root / "patient003" / "patient003_frame05.nii.gz").write_bytes(b"corrupt")
    out = tmp_path / "out"
    assert prepare_acdc.main(["--source", str(root), "--out", str(out), "--val-patients", "1", "--test-patients", "0"]) == 0
    assert "patient003" in capsys.readouterr().err
    assert not (out / "patient003_slice00_ED.nii.gz").exists()


def _camus_view(folder: Path, patient: str, view: str, ext: str, shape=(90, 70), dtype=np.float64, skip=None, fractional=False):
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for phase, radius in (("ED", 20.0), ("ES", 15.0)):
        distance = np.hypot(x - shape[0] / 2, y - shape[1] / 2)
        label = np.zeros(shape, np.float64)
        label[distance < radius + 5] = 2
        label[distance < radius] = 1
        if fractional:
            label[distance < radius + 5] += 0.2 * (np.abs(distance[distance < radius + 5] - radius) < 1)
        image = label / 3.0
        if dtype == np.uint8:
            image = np.round(image * 255).astype(np.uint8)
            label = np.rint(label).astype(np.uint8)
        for suffix, array in (("", image), ("_gt", label)):
            name = f"{patient}_{view}_{phase}{suffix}"
            if name == skip:
                continue
            if ext == "npy":
                np.save(folder / f"{name}.npy", array)
            else:
                _save(array.astype(np.float32)[..., None], folder / f"{name}.nii.gz", zooms=(0.3, 0.15, 1.0))


def test_camus_official_nifti_layout(tmp_path, capsys):
    root = tmp_path / "database_nifti"
    for i in range(1, 5):
        folder = root / f"patient{i:04d}"
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            _camus_view(folder, folder.name, view, "nii.gz", skip="patient0004_4CH_ES_gt" if i == 4 else None)
    out = tmp_path / "out"
    assert prepare_camus.main(["--source", str(root), "--out", str(out), "--val-patients", "1", "--test-patients", "1"]) == 0
    assert "patient0004_4CH" in capsys.readouterr().err
    datalist = _read_datalist(out)
    assert sum(len(datalist[s]) for s in ("training", "validation", "testing")) == 7
    image = nib.load(str(out / "patient0001_2CH_ED.nii.gz"))
    assert image.shape == (128, 128)
    assert np.allclose(image.header.get_zooms()[:2], (0.3 * 90 / 128, 0.15 * 70 / 128), atol=1e-5)
    label = np.asarray(nib.load(str(out / "patient0001_2CH_ED_gt.nii.gz")).dataobj)
    assert set(np.unique(label)) == {0, 1, 2}


def test_camus_numpy_layouts_round_labels_and_scale_uint8(tmp_path):
    float_root, uint8_root = tmp_path / "camus", tmp_path / "camus_train"
    float_root.mkdir()
    uint8_root.mkdir()
    for i in (1, 2, 3):
        _camus_view(uint8_root, f"patient{i:04d}", "2CH", "npy", dtype=np.uint8)
    _camus_view(float_root, "patient0010", "4CH", "npy", fractional=True)
    out = tmp_path / "out"
    code = prepare_camus.main(["--source", str(uint8_root), "--test-source", str(float_root), "--out", str(out), "--val-patients", "1"])
    assert code == 0
    datalist = _read_datalist(out)
    assert [item["patient"] for item in datalist["testing"]] == ["patient0010"]
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    train_image = np.asarray(nib.load(str(out / "patient0001_2CH_ED.nii.gz")).dataobj)
    assert 0.5 < train_image.max() <= 1.0  # uint8 / 255
    label = np.asarray(nib.load(str(out / "patient0010_4CH_ED_gt.nii.gz")).dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
    assert datalist["metadata"]["cases"]["patient0010_4CH"]["spacing_mm"] is None


def test_camus_not_a_camus_folder(tmp_path):
    (tmp_path / "x").mkdir()
    np.save(tmp_path / "x" / "image.npy", np.zeros((4, 4)))
    with pytest.raises(SystemExit, match="not a CAMUS folder"):
        prepare_camus.main(["--source", str(tmp_path / "x"), "--out", str(tmp_path / "out")])


def test_shared_acdc_and_camus_subsets(tmp_path):
    acdc, camus = SHARED_DATA / "acdc", SHARED_DATA / "camus"
    if not (acdc / "pairs.csv").is_file() or not (camus / "pairs.csv").is_file():
        pytest.skip(f"real data not found at {SHARED_DATA} (acdc/, camus/)")
    pytest.importorskip("h5py")
    subset = tmp_path / "acdc"
    subset.mkdir()
    lines = (acdc / "pairs.csv").read_text().splitlines()
    (subset / "pairs.csv").write_text("\n".join(lines[:4]) + "\n")  # header + 3 patients
    for line in lines[1:4]:
        for name in line.split(",")[4:6]:
            shutil.copy(acdc / name, subset / name)
    out = tmp_path / "out_acdc"
    assert prepare_acdc.main(["--source", str(subset), "--out", str(out), "--val-patients", "1", "--test-patients", "1"]) == 0
    datalist = _read_datalist(out)
    item = datalist["training"][len(datalist["training"]) // 2]
    label = np.asarray(nib.load(str(out / item["moving_label"])).dataobj)
    assert label.shape == (128, 128) and set(np.unique(label)) <= {0, 1, 2, 3}
    camus_subset = tmp_path / "camus"
    camus_subset.mkdir()
    for path in camus.glob("patient0027_*.npy"):
        shutil.copy(path, camus_subset / path.name)
    out = tmp_path / "out_camus"
    assert prepare_camus.main(["--source", str(camus_subset), "--out", str(out), "--val-patients", "0"]) == 0
    label = np.asarray(nib.load(str(out / "patient0027_2CH_ES_gt.nii.gz")).dataobj)
    assert set(np.unique(label)) == {0, 1, 2, 3}
