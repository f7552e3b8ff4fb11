"""TorchScript export of the displacement network through MONAI's ``ckpt_export`` (the function behind
``python -m monai.bundle ckpt_export ... --use_trace True --input_shape "[1,2,128,128]"``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export
from monai.data import load_net_with_metadata

from conftest import BUNDLE

from scripts.networks import DiffeomorphicVoxelMorph


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiffeomorphicVoxelMorph]:
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = DiffeomorphicVoxelMorph(head_init_std=1.0)  # a non-trivial field (the default init gives ~0)
    torch.save(net.state_dict(), folder / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(folder / "model.ts"),
        ckpt_file=str(folder / "model.pt"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        config_file=str(BUNDLE / "configs" / "inference.yaml"),
        use_trace=True,
        input_shape=[1, 2, 128, 128],
    )
    return folder / "model.ts", net.eval()


@pytest.mark.parametrize("shape", [(1, 2, 128, 128), (2, 2, 96, 160)], ids=["traced_size", "other_size_batch2"])
def test_traced_network_gives_the_eager_field(exported, shape) -> None:
    path, net = exported
    scripted = torch.jit.load(str(path))
    image = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager, traced = net(image), scripted(image)
    assert eager.abs().max() > 0.5  # the comparison is not between two zero fields
    assert traced.shape == eager.shape == (shape[0], 2) + shape[2:]
    torch.testing.assert_close(traced, eager, atol=1e-5, rtol=0)


def test_export_carries_metadata_and_config(exported) -> None:
    path, _ = exported
    _, meta, extra = load_net_with_metadata(str(path), more_extra_files=("inference.json",))
    assert meta["version"] and meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert "network_def" in json.loads(extra["inference.json"])
