"""The bundle as the model zoo checks it: ``bundle/`` alone, copied elsewhere, runs its workflows
(``ConfigWorkflow``: initialize -> check_properties() == [] -> run -> finalize) for train, evaluate and
inference on tiny data, and passes ``verify_metadata`` and ``verify_net_in_out``, also with each backbone config
(``configs/backbone_*.yaml`` on ``inference.yaml``)."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out

from conftest import BUNDLE, REPO, SCHEMA

BACKBONES = sorted(p.name for p in (BUNDLE / "configs").glob("backbone_*.yaml"))
TINY = {"epochs": 2, "epoch_length": 2, "image_size": [64, 64], "num_train_pairs": 4, "num_val_pairs": 2,
        "batch_size": 2, "accumulation_steps": 1, "motion_warmup_epochs": 1, "scoring_warmup_epochs": 1,
        "num_workers": 0, "log_every": 1}


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory: pytest.TempPathFactory):
    """A copy of bundle/ (no eval outputs, no weights) first on sys.path, with its own ``scripts`` package."""
    root = tmp_path_factory.mktemp("zoo") / "adacs_bundle"
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("eval", "__pycache__", "*.pt", "*.ts"))
    saved_modules = {k: v for k, v in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
    for key in saved_modules:
        del sys.modules[key]
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
        del sys.modules[key]
    sys.modules.update(saved_modules)


def _workflow(root: Path, configs: list[str], workflow_type: str, **override) -> ConfigWorkflow:
    files = [str(root / "configs" / c) for c in configs]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(root),
        **override,
    )


def _zoo_run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


def test_copied_bundle_train_evaluate_infer(bundle_copy: Path, tmp_path: Path) -> None:
    import scripts  # the copy's package, not the repository's

    assert Path(scripts.__file__).resolve().parent == (bundle_copy / "scripts").resolve()

    _zoo_run(_workflow(bundle_copy, ["train.yaml"], "train", **TINY))
    trained = bundle_copy / "models" / "phantom" / "model.pt"  # phantom runs never overwrite models/model.pt
    assert trained.is_file()

    # the zoo's own unit tests run the evaluate override with workflow_type "train" (it overrides train.yaml)
    _zoo_run(_workflow(bundle_copy, ["train.yaml", "evaluate.yaml"], "train", **TINY, num_test_pairs=2,
                       ckpt_path=str(trained)))  # the weights just trained (the default is the shipped model.pt)
    assert list((bundle_copy / "eval").glob("*.csv")), "evaluation wrote no metrics CSV"

    pairs = tmp_path / "pairs"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_phantom_nifti.py"), "--out", str(pairs),
                    "--num-pairs", "2", "--size", "80"], check=True, capture_output=True)
    out = tmp_path / "inference"
    _zoo_run(_workflow(bundle_copy, ["inference.yaml"], "infer", dataset_dir=str(pairs), output_dir=str(out),
                       image_size=[64, 64], progress=False, ckpt_path=str(trained)))
    with open(out / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all((out / name).is_file() for r in rows for name in r["outputs"].split(";"))


def test_verify_metadata_and_net_in_out(bundle_copy: Path) -> None:
    meta = str(bundle_copy / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(SCHEMA))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=str(bundle_copy / "configs" / "inference.yaml"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backbone", BACKBONES, ids=[Path(b).stem.removeprefix("backbone_") for b in BACKBONES])
def test_backbone_configs_load_from_the_packaged_bundle(bundle_copy: Path, backbone: str) -> None:
    """The copy's ``network_def`` with a backbone config (what inference, export and the MONAI Label app build)
    passes ``verify_net_in_out`` and maps a (1, 2, 128, 128) pair to a field of the same size."""
    from scripts.inference_engine import network_from_config  # the copy's package

    configs = [str(bundle_copy / "configs" / name) for name in ("inference.yaml", backbone)]
    verify_net_in_out(net_id="network_def", meta_file=str(bundle_copy / "configs" / "metadata.json"),
                      config_file=configs)
    net = network_from_config(backbone, bundle_copy).eval()
    assert Path(sys.modules[type(net).__module__].__file__).resolve().is_relative_to(bundle_copy.resolve())
    with torch.no_grad():
        field = net(torch.rand(1, 2, 128, 128, generator=torch.Generator().manual_seed(0)))
    assert field.shape == (1, 2, 128, 128) and bool(torch.isfinite(field).all())
