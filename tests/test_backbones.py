"""Issue 30 item 3: every backbone (``configs/backbone_*.yaml``, selected by ``network_def`` alone) goes through the
shipped network's inference paths: folder inference (the command line, with weights trained for it), TorchScript
export (``ckpt_export``, tracing) and the MONAI Label app's network (built from the bundle's configs); an
``image_size`` the backbone cannot take stops inference with one line. Each backbone's training is in its own test
file (``test_transmorph.py``, ``test_diffusemorph.py``), its loading from the packaged bundle in ``test_packaging.py``.
A new ``backbone_<name>.yaml`` is covered without editing this file."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE

from scripts.inference_engine import check_image_size, network_config_file, network_from_config, register_folder
from scripts.io_safety import load_weights
from scripts.networks import DiffeomorphicVoxelMorph
from scripts.registration_io import PairRegistration

BACKBONES = sorted((BUNDLE / "configs").glob("backbone_*.yaml"))
IDS = [p.stem.removeprefix("backbone_") for p in BACKBONES]
INFERENCE = str(BUNDLE / "configs" / "inference.yaml")
NATIVE = 80  # the phantom pairs' size: inference resamples to image_size (128) and back

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two phantom pairs with labels, 80 x 80."""
    from scripts.phantom import cardiac_phantom_pair

    folder = tmp_path_factory.mktemp("pairs")
    for index in range(2):
        pair = cardiac_phantom_pair(300000 + index, size=NATIVE)
        for frame, image, label in (("ED", "moving", "moving_label"), ("ES", "fixed", "fixed_label")):
            nib.save(nib.Nifti1Image(pair[image][0].astype(np.float32), np.eye(4)), str(folder / f"c{index}_{frame}.nii.gz"))
            nib.save(nib.Nifti1Image(pair[label][0].astype(np.uint8), np.eye(4)), str(folder / f"c{index}_{frame}_gt.nii.gz"))
    return folder


@pytest.fixture(scope="module", params=BACKBONES, ids=IDS)
def backbone(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The backbone's network as ``inference.yaml`` + its config builds it, its weights perturbed so that the field is
    visible (a freshly initialised head gives ~0), in eval mode, and those weights saved to a file."""
    config = request.param
    torch.manual_seed(0)
    net = network_from_config(config.name)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    weights = tmp_path_factory.mktemp(config.stem) / "model.pt"
    torch.save(net.state_dict(), weights)
    return {"config": config, "net": net.eval(), "weights": weights}


def test_folder_inference_from_the_command_line(backbone, pairs, tmp_path) -> None:
    """``python -m monai.bundle run --config_file "['configs/inference.yaml','configs/backbone_<name>.yaml']"
    --ckpt_path <its weights> --dataset_dir <folder>`` registers the folder at the default image_size (128), each
    field that of the backbone (the engine's registration of the pair with the eager network)."""
    out = tmp_path / "out"
    configs = f"['configs/inference.yaml','configs/{backbone['config'].name}']"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--ckpt_path", str(backbone["weights"]),
         "--dataset_dir", str(pairs), "--output_dir", str(out), "--progress", "false", "--write_itk", "false"],
        cwd=BUNDLE, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"displacement network weights: {os.path.realpath(backbone['weights'])}" in result.stdout + result.stderr
    with open(out / "summary.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["c0", "c1"] and all(row["status"] == "ok" for row in rows.values())
    assert all(float(row["dice"]) > 0 for row in rows.values())
    engine = PairRegistration(backbone["net"], (128, 128))
    for case in rows:
        moving = nib.load(str(pairs / f"{case}_ED.nii.gz")).get_fdata(dtype=np.float32)
        fixed = nib.load(str(pairs / f"{case}_ES.nii.gz")).get_fdata(dtype=np.float32)
        expected = engine(moving[None], fixed[None]).ddf[0].numpy()  # (2, H, W), pixels of the native grid
        written = nib.load(str(out / f"{case}_ddf.nii.gz")).get_fdata(dtype=np.float32)  # (H, W, 2)
        assert written.shape == (NATIVE, NATIVE, 2) and np.abs(written).max() > 0.02
        np.testing.assert_allclose(np.moveaxis(written, -1, 0), expected, atol=1e-4)


@pytest.mark.parametrize("config", [None, *BACKBONES], ids=["shipped", *IDS])
def test_an_image_size_the_network_cannot_take_stops_inference_with_one_line(config, pairs, tmp_path) -> None:
    """100 x 100 (not a multiple of 8: TransMorph takes multiples of 32, the VoxelMorph UNet and DiffuseMorph of 16)
    ends the run before anything is written, with one line naming the size and the network."""
    configs = [INFERENCE] + ([str(config)] if config else [])
    net = network_from_config(config.name if config else None)
    weights = tmp_path / "model.pt"
    torch.save(net.state_dict(), weights)
    with pytest.raises(SystemExit) as stopped:
        register_folder(pairs, tmp_path / "out", ckpt_path=weights, config_file=configs, image_size=[100, 100])
    message = str(stopped.value)
    assert message.startswith(f"error: image_size [100, 100] does not fit the displacement network {type(net).__name__}")
    assert "\n" not in message and not (tmp_path / "out").exists()
    if getattr(net, "size_multiple", None):
        assert f"multiples of {net.size_multiple}" in message


@pytest.fixture(scope="module")
def exported(backbone, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m monai.bundle ckpt_export --net_id network_def --config_file "['configs/inference.yaml',
    'configs/backbone_<name>.yaml']" --use_trace True --input_shape "[1,2,128,128]"``, in-process."""
    from monai.bundle import ckpt_export

    path = tmp_path_factory.mktemp("export") / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(path), ckpt_file=str(backbone["weights"]),
                meta_file=str(BUNDLE / "configs" / "metadata.json"), config_file=[INFERENCE, str(backbone["config"])],
                use_trace=True, input_shape=[1, 2, 128, 128])
    return path


@pytest.mark.parametrize("batch", [1, 2])
def test_traced_export_gives_the_eager_field(backbone, exported, batch) -> None:
    traced = torch.jit.load(str(exported))
    image = torch.rand((batch, 2, 128, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, field = backbone["net"](image), traced(image)
    assert eager.abs().max() > 0.05  # the comparison is not between two zero fields
    assert field.shape == eager.shape == (batch, 2, 128, 128)
    torch.testing.assert_close(field, eager, atol=1e-5, rtol=0)


def test_monai_label_network_is_the_backbone_with_its_weights(backbone) -> None:
    """What the MONAI Label app builds for ``--conf network_config backbone_<name>.yaml`` (its tasks'
    ``_network``: ``network_from_config``, the weights loaded by the bundle's checks, the grid size checked)."""
    config = backbone["config"]
    for name in (config.name, f"configs/{config.name}", str(config)):  # by name, relative to the bundle, absolute
        assert network_config_file(name) == config
    net = network_from_config(config.name, BUNDLE)
    assert type(net) is type(backbone["net"])
    load_weights(net, backbone["weights"], "displacement network")
    check_image_size(net, (128, 128))
    image = torch.rand((1, 2, 128, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(image), backbone["net"](image), atol=0, rtol=0)


def test_monai_label_network_default_and_unknown_config() -> None:
    assert type(network_from_config()) is DiffeomorphicVoxelMorph  # no --conf network_config: inference.yaml's own
    with pytest.raises(SystemExit) as stopped:
        network_from_config("backbone_nothing.yaml")
    message = str(stopped.value)
    assert message.startswith("error: backbone_nothing.yaml: network config not found")
    assert all(config.name in message for config in BACKBONES)
    with pytest.raises(SystemExit, match="sets no network_def"):
        network_from_config("schedule_cpu.yaml")
