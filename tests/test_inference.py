"""Inference on a folder of NIfTI pairs (configs/inference.yaml: scripts/inference_engine.py, registration_io.py).

Checks geometry (affines read back with nibabel), the ITK displacement field applied by ITK itself, native-size
mapping of the field, 2D / one-slice / 3D-stack inputs, the summary CSV, faults reported per case with a
non-zero exit status, atomic outputs and never overwriting inputs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from conftest import BUNDLE, REPO

from scripts.inference_engine import register_folder
from scripts.io_safety import atomic_write
from scripts.networks import DiffeomorphicVoxelMorph, ScoringNet, ZeroDisplacement
from scripts.registration_io import collect_pairs, itk_field_extension, load_pair, resize_ddf

itk = pytest.importorskip("itk")


class SmoothField(torch.nn.Module):
    """A known smooth field on whatever grid it is given (pixels of that grid), independent of the images."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape
        i = torch.linspace(0, 1, h).view(1, 1, h, 1)
        j = torch.linspace(0, 1, w).view(1, 1, 1, w)
        u0 = 4 * torch.sin(3 * i + 2 * j).expand(b, 1, h, w)
        u1 = 3 * torch.cos(2 * i - 3 * j).expand(b, 1, h, w)
        return torch.cat([u0, u1], 1)


class ConstantField(torch.nn.Module):
    def __init__(self, shift: tuple[float, float]) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(image[:, :2])
        out[:, 0], out[:, 1] = self.shift
        return out


def _affine(oblique: bool, in_plane_only: bool = False) -> np.ndarray:
    rotation = np.eye(3)
    if oblique:
        angles = ("z", [25]) if in_plane_only else ("xyz", [10, 20, 30])
        rotation = Rotation.from_euler(angles[0], angles[1], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.3, 1.7, 8.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


def _image(shape: tuple[int, ...], phase: float = 0.0) -> np.ndarray:
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    base = (np.sin(x / 7.0 + phase) * np.cos(y / 9.0) + 1.0).astype(np.float32)
    if len(shape) == 3:
        base = np.repeat(base[..., None], shape[2], -1) * (1 + 0.1 * np.arange(shape[2]))
    return base.astype(np.float32)


def _write_pair(folder: Path, case: str, shape: tuple[int, ...], affine: np.ndarray, labels: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_image(shape), affine), str(folder / f"{case}_ED.nii.gz"))
    nib.save(nib.Nifti1Image(_image(shape, 0.3), affine), str(folder / f"{case}_ES.nii.gz"))
    if labels:
        x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        centre = np.array(shape[:2]) / 2
        radius = np.hypot(x - centre[0], y - centre[1])
        for name, r in (("ED", 20), ("ES", 16)):
            lab = np.where(radius < r, 3, np.where(radius < r + 6, 2, 0)).astype(np.uint8)
            lab[: shape[0] // 4] = np.where(lab[: shape[0] // 4] == 0, 1, lab[: shape[0] // 4])
            if len(shape) == 3:
                lab = np.repeat(lab[..., None], shape[2], -1)
            nib.save(nib.Nifti1Image(lab.reshape(shape), affine), str(folder / f"{case}_{name}_gt.nii.gz"))


def _run(folder: Path, out: Path, network: torch.nn.Module, **kwargs) -> list[dict]:
    """configs/inference.yaml in-process with ``network`` (no weights file); the summary rows."""
    return register_folder(folder, out, network, **kwargs)


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _itk_read(path: Path, pixel, dim: int):
    reader = itk.ImageFileReader[itk.Image[pixel, dim]].New(FileName=str(path))
    reader.Update()
    return reader.GetOutput()


def _from_itk(image) -> np.ndarray:
    """ITK image -> array indexed like the NIfTI array (x, y[, z]) (vector components last)."""
    array = itk.array_from_image(image)
    dim = image.GetImageDimension()
    return np.transpose(array, tuple(reversed(range(dim))) + tuple(range(dim, array.ndim)))


# shapes: pure 2D (ITK: 2D, in-plane rotation only: ITK cannot store a non-orthogonal 2D direction),
# one-slice 3D (double oblique), 3D short-axis stack (double oblique); all with non-128 sizes
CASES = [((96, 150), _affine(True, in_plane_only=True)), ((96, 150, 1), _affine(True)), ((80, 70, 5), _affine(True))]


@pytest.mark.parametrize("shape, affine", CASES, ids=["2d", "one_slice", "stack"])
def test_outputs_geometry_and_itk_field(tmp_path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    _write_pair(tmp_path / "in", "c", shape, affine)
    rows = _run(tmp_path / "in", tmp_path / "out", SmoothField())
    assert [r["status"] for r in rows] == ["ok"], rows
    out = tmp_path / "out"
    moving = nib.load(str(tmp_path / "in" / "c_ED.nii.gz")).get_fdata()
    ddf_img, warped_img = nib.load(str(out / "c_ddf.nii.gz")), nib.load(str(out / "c_warped.nii.gz"))
    for image in (ddf_img, warped_img):  # geometry preserved
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert warped_img.shape == moving.shape
    is_stack = len(shape) == 3 and shape[2] > 1
    assert ddf_img.shape == shape + ((3,) if is_stack else (2,))
    assert ddf_img.header.get_intent()[0] == "vector"
    ddf = ddf_img.get_fdata()
    if is_stack:
        assert np.all(ddf[..., 2] == 0), "through-plane component must be zero"

    # the voxel field is in native pixels: warping with scipy (independent of MONAI) reproduces our warped image
    mov2 = moving.reshape(shape[:2] + (-1,))
    d2 = ddf.reshape(shape[:2] + (-1, ddf.shape[-1]))
    grid = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"))
    warped2 = warped_img.get_fdata().reshape(mov2.shape)
    inner = (slice(6, -6), slice(6, -6))
    for k in range(mov2.shape[-1]):
        coords = grid + np.moveaxis(d2[:, :, k, :2], -1, 0)
        expected = map_coordinates(mov2[:, :, k], coords, order=1, mode="constant", cval=0.0)
        np.testing.assert_allclose(warped2[:, :, k][inner], expected[inner], atol=1e-4)

    # the ITK field, read and applied by ITK to the moving image as ITK reads it, gives our warped image
    dim = 2 if len(shape) == 2 else 3
    field_path = out / f"c_ddf_itk{'.nrrd' if shape[-1] == 1 and len(shape) == 3 else '.nii.gz'}"
    field = _itk_read(field_path, itk.Vector[itk.F, dim], dim)
    moving_itk = _itk_read(tmp_path / "in" / "c_ED.nii.gz", itk.F, dim)
    assert np.allclose(field.GetSpacing(), moving_itk.GetSpacing())
    assert np.allclose(itk.array_from_matrix(field.GetDirection()), itk.array_from_matrix(moving_itk.GetDirection()), atol=1e-5)
    assert np.allclose(field.GetOrigin(), moving_itk.GetOrigin(), atol=1e-4)
    image_type = type(moving_itk)
    warp = itk.WarpImageFilter[image_type, image_type, type(field)].New(Input=moving_itk, DisplacementField=field)
    warp.SetOutputParametersFromImage(field)
    warp.Update()
    itk_warped = _from_itk(warp.GetOutput()).reshape(mov2.shape)
    np.testing.assert_allclose(itk_warped[inner], warped2[inner], atol=1e-4)
    # and the vectors are millimetres: |d_phys| = |A[:3,:3] d_vox| (rotation-invariant norm)
    phys = _from_itk(field).reshape(d2.shape[:3] + (dim,))
    vox3 = np.concatenate([d2[..., :2], np.zeros(d2.shape[:3] + (1,))], -1)
    mm = vox3 @ affine[:3, :3].T
    np.testing.assert_allclose(np.linalg.norm(phys, axis=-1), np.linalg.norm(mm[..., :dim] if dim == 2 else mm, axis=-1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("size", [(64, 64), (200, 160)])
def test_field_mapped_back_to_native_pixels(tmp_path: Path, size: tuple[int, int]) -> None:
    """A constant shift of s network pixels is s * native/128 native pixels: the warped image is the shifted one."""
    shift_native = (3.0, -2.0)
    shift_net = (shift_native[0] * 128 / size[0], shift_native[1] * 128 / size[1])
    _write_pair(tmp_path / "in", "c", size, np.diag([0.8, 0.9, 1.0, 1.0]))
    rows = _run(tmp_path / "in", tmp_path / "out", ConstantField(shift_net))
    assert rows[0]["status"] == "ok"
    ddf = nib.load(str(tmp_path / "out" / "c_ddf.nii.gz")).get_fdata()
    np.testing.assert_allclose(ddf[..., 0], shift_native[0], atol=1e-4)
    np.testing.assert_allclose(ddf[..., 1], shift_native[1], atol=1e-4)
    moving = nib.load(str(tmp_path / "in" / "c_ED.nii.gz")).get_fdata()
    warped = nib.load(str(tmp_path / "out" / "c_warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(warped[5:-5, 5:-5], moving[8:-2, 3:-7], atol=1e-4)  # warped[x] = moving[x + (3, -2)]


def test_resize_ddf_scales_vectors() -> None:
    field = torch.ones(1, 2, 128, 128)
    out = resize_ddf(field, (256, 64))
    assert out.shape == (1, 2, 256, 64)
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], 2.0)) and torch.allclose(out[:, 1], torch.full_like(out[:, 1], 0.5))


def test_labels_dice_and_identity(tmp_path: Path) -> None:
    """Identity field: warped labels are the moving labels and Dice equals the undeformed Dice (computed here)."""
    _write_pair(tmp_path / "in", "c", (100, 90), np.diag([1.5, 1.5, 1, 1]), labels=True)
    rows = _run(tmp_path / "in", tmp_path / "out", ZeroDisplacement())
    row = _read_csv(tmp_path / "out" / "summary.csv")[0]
    assert row["status"] == "ok" and rows[0]["status"] == "ok"
    moving_label = nib.load(str(tmp_path / "in" / "c_ED_gt.nii.gz")).get_fdata()
    fixed_label = nib.load(str(tmp_path / "in" / "c_ES_gt.nii.gz")).get_fdata()
    warped_label = nib.load(str(tmp_path / "out" / "c_warped_gt.nii.gz")).get_fdata()
    np.testing.assert_array_equal(warped_label, moving_label)
    dices = [2 * np.sum((moving_label == k) & (fixed_label == k)) / (np.sum(moving_label == k) + np.sum(fixed_label == k))
             for k in (1, 2, 3)]
    assert float(row["dice"]) == pytest.approx(np.mean(dices), abs=1e-4)
    assert float(row["dice_undeformed"]) == pytest.approx(float(row["dice"]))
    assert float(row["folding_pct"]) == 0.0
    assert float(row["time_s"]) > 0


def test_faults_reported_per_case(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for case in ("good", "broken", "lonely", "unequal"):
        _write_pair(folder, case, (64, 64), np.eye(4))
    (folder / "broken_ES.nii.gz").write_bytes(b"not a nifti file")
    (folder / "lonely_ES.nii.gz").unlink()
    nib.save(nib.Nifti1Image(_image((64, 70)), np.eye(4)), str(folder / "unequal_ES.nii.gz"))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        _run(folder, out, SmoothField())
    assert stop.value.code == 1
    rows = {r["case"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["good"]["status"] == "ok"
    assert rows["broken"]["status"] == "failed" and "broken_ES.nii.gz" in rows["broken"]["error"]
    assert rows["lonely"]["status"] == "failed" and "no ES frame" in rows["lonely"]["error"]
    assert rows["unequal"]["status"] == "failed" and "unequal shapes" in rows["unequal"]["error"]
    assert "unequal_ES.nii.gz" in rows["unequal"]["error"]
    names = sorted(p.name for p in out.iterdir())
    assert all(n.startswith("good_") or n == "summary.csv" for n in names), names  # failed cases leave nothing
    assert not [n for n in names if n.startswith(".tmp")]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # inputs untouched


def test_refuses_output_in_input_folder(tmp_path: Path) -> None:
    _write_pair(tmp_path, "c", (32, 32), np.eye(4))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit, match="input folder"):
        _run(tmp_path, tmp_path, SmoothField())
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "x.nii.gz"

    def failing(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


def test_datalist_json(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_pair(data, "a", (48, 48), np.eye(4), labels=True)
    (data / "a_ED.nii.gz").rename(data / "first.nii.gz")
    (data / "a_ES.nii.gz").rename(data / "second.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"testing": [{"moving": "first.nii.gz", "fixed": "second.nii.gz",
                                                 "moving_label": "a_ED_gt.nii.gz", "fixed_label": "a_ES_gt.nii.gz"}]}))
    items = collect_pairs(str(data), str(datalist))
    assert items[0]["case"] == "first" and items[0]["moving"] == str(data / "first.nii.gz")
    rows = register_folder(data, tmp_path / "out", ZeroDisplacement(), datalist=datalist)
    assert rows[0]["status"] == "ok" and rows[0]["dice"] != ""
    assert (tmp_path / "out" / "first_warped_gt.nii.gz").is_file()


def test_score_map_option(tmp_path: Path) -> None:
    _write_pair(tmp_path / "in", "c", (72, 72), np.eye(4))
    ckpt = tmp_path / "scoring.pt"
    torch.save(ScoringNet().state_dict(), ckpt)
    _run(tmp_path / "in", tmp_path / "out_plain", ZeroDisplacement(), write_itk=False)
    assert not list((tmp_path / "out_plain").glob("*_score.nii.gz"))  # default off
    _run(tmp_path / "in", tmp_path / "out", ZeroDisplacement(), score_map=True, scoring_network=ScoringNet(),
         scoring_ckpt_path=str(ckpt), write_itk=False)
    score = nib.load(str(tmp_path / "out" / "c_score.nii.gz"))
    assert score.shape == (72, 72) and 0 < score.get_fdata().min() and score.get_fdata().max() < 1


@pytest.mark.parametrize("spelling", ["false", "False", "0", "no"])
def test_switches_written_as_on_the_command_line(tmp_path: Path, spelling: str) -> None:
    """`--write_itk false` / `--score_map false` arrive from the bundle CLI as strings: every spelling of false is
    false ('false' is truthy as a Python string), and 'true' turns the ITK field on."""
    _write_pair(tmp_path / "in", "c", (72, 72), np.eye(4))
    _run(tmp_path / "in", tmp_path / "off", ZeroDisplacement(), write_itk=spelling, score_map=spelling)
    names = sorted(p.name for p in (tmp_path / "off").iterdir())
    assert not [n for n in names if "_itk" in n or "_score" in n], names
    _run(tmp_path / "in", tmp_path / "on", ZeroDisplacement(), write_itk="true")
    assert list((tmp_path / "on").glob("c_ddf_itk.*"))


def test_collect_pairs_lower_case_names_and_ignored_files(tmp_path: Path, caplog) -> None:
    """``case1_ed.nii.gz`` / ``case1_es.nii.gz`` form a pair; a file outside the naming rule is named in the log."""
    _write_pair(tmp_path, "ok", (32, 32), np.eye(4))
    for old, new in (("ok_ED", "case1_ed"), ("ok_ES", "case1_es")):
        (tmp_path / f"{old}.nii.gz").rename(tmp_path / f"{new}.nii.gz")
    (tmp_path / "case2_end.nii.gz").write_bytes(b"")
    with caplog.at_level("WARNING"):
        items = collect_pairs(str(tmp_path))
    assert [(i["case"], i.get("error")) for i in items] == [("case1", None)]
    assert items[0]["moving"].endswith("case1_ed.nii.gz") and items[0]["fixed"].endswith("case1_es.nii.gz")
    assert "ignored 1 file" in caplog.text and "case2_end.nii.gz" in caplog.text
    (tmp_path / "case1_ED.nii.gz").write_bytes(b"")  # beside case1_ed.nii.gz: which one is meant?
    (error,) = [i["error"] for i in collect_pairs(str(tmp_path))]
    assert "case1_ED.nii.gz and case1_ed.nii.gz" in error and "two files for one frame" in error


def test_one_slice_files_get_nrrd_itk_field(tmp_path: Path) -> None:
    _write_pair(tmp_path, "c", (32, 32, 1), np.eye(4))
    _write_pair(tmp_path, "d", (32, 32, 3), np.eye(4))
    pairs = {item["case"]: load_pair(item) for item in collect_pairs(str(tmp_path))}
    assert itk_field_extension(pairs["c"]) == ".nrrd" and itk_field_extension(pairs["d"]) == ".nii.gz"


@pytest.mark.slow  # two `python -m monai.bundle run` processes (~1 min each on a busy 2-core CPU)
def test_bundle_config_end_to_end(tmp_path: Path) -> None:
    """The bundle's own command line: outputs, progress bar, summary, exit status 0, then 1 with a broken case."""
    data = tmp_path / "pairs"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_phantom_nifti.py"), "--out", str(data),
                    "--num-pairs", "2", "--size", "96"], check=True, capture_output=True)
    ckpt = tmp_path / "model.pt"
    torch.manual_seed(0)
    torch.save(DiffeomorphicVoxelMorph(head_init_std=1e-2).state_dict(), ckpt)
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--dataset_dir", str(data), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(ckpt)]
    env = {**os.environ, "PYTHONPATH": str(BUNDLE)}
    done = subprocess.run(command, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registering" in done.stderr and "2 of 2 pairs registered" in done.stdout  # ignite's bar, summary line
    rows = _read_csv(tmp_path / "out" / "summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(r["dice"] for r in rows)
    for row in rows:
        for name in row["outputs"].split(";"):
            assert (tmp_path / "out" / name).is_file()
    (data / "phantom300001_ES.nii.gz").write_bytes(b"corrupt")
    done = subprocess.run(command + ["--overwrite", "true"], cwd=BUNDLE, env=env, capture_output=True, text=True,
                          timeout=300)  # the same output folder: its earlier outputs are replaced (issue 31 item 8)
    assert done.returncode == 1
    assert "phantom300001_ES.nii.gz" in done.stderr + done.stdout


def test_real_data_label_propagation_plumbing(tmp_path: Path) -> None:
    """scripts/propagate_labels_eval.py on one real pair per dataset with an identity-initialised network (flow head
    zero): the conversions give overlapping ED/ES labels, the engine runs every geometry (2D echo, 2D DICOM, the
    M&Ms-2 3D stack with its true spacing), and with a zero field the registered Dice is the undeformed Dice."""
    from conftest import shared_data

    data = shared_data("")
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import propagate_labels_eval as propagate
    finally:
        sys.path.remove(str(REPO / "scripts"))
    net = DiffeomorphicVoxelMorph()
    torch.nn.init.zeros_(net.unet.net[1].final_conv_out.conv.weight)
    ckpt = tmp_path / "identity.pt"
    torch.save(net.state_dict(), ckpt)
    for dataset in ("camus", "sunnybrook", "mnms2"):
        if not (data / dataset).is_dir():
            continue
        rows = propagate.evaluate(dataset, data, ckpt, tmp_path / "work", max_pairs=1)
        assert rows and all(r["status"] == "ok" for r in rows), rows
        for row in rows:
            assert float(row["dice"]) == pytest.approx(float(row["dice_undeformed"]), abs=1e-6)
            lv = 1  # LV cavity is label 1 in all three datasets
            assert 0.3 < propagate._per_class(row["dice_undeformed_per_class"])[lv] < 0.99, (dataset, row)
        if dataset == "mnms2":
            out = tmp_path / "work" / "mnms2" / "out"
            source = nib.load(str(data / "mnms2" / "001" / "001_SA_ED.nii.gz"))
            ddf = nib.load(str(out / "001_SA_ddf.nii.gz"))
            assert ddf.shape == source.shape + (3,)
            np.testing.assert_allclose(ddf.affine, source.affine, atol=1e-5)
            np.testing.assert_allclose(ddf.header.get_zooms()[:3], source.header.get_zooms()[:3], atol=1e-5)


def test_config_preprocessing_matches_engine() -> None:
    """The config's `preprocessing` (ScaleIntensityd + Resized) and the engine's batched minmax_resize agree."""
    from monai.bundle import ConfigParser

    from scripts.registration_io import minmax_resize

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.yaml"))
    preprocessing = parser.get_parsed_content("preprocessing")
    rng = np.random.default_rng(0)
    moving, fixed = (rng.random((1, 100, 140)).astype(np.float32) * 50 + 3 for _ in range(2))
    out = preprocessing({"moving": moving, "fixed": fixed})
    for key, array in (("moving", moving), ("fixed", fixed)):
        expected = minmax_resize(torch.as_tensor(array)[None], (128, 128))[0]
        torch.testing.assert_close(torch.as_tensor(out[key]).float(), expected, atol=1e-5, rtol=0)
