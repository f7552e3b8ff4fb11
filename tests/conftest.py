"""Shared test setup: the bundle on sys.path, paths to the repo and ../shared/data, the opt-in slow marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
SHARED_DATA = REPO.parent / "shared" / "data"
SCHEMA = REPO / "schemas" / "meta_schema_20240725.json"

if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long test, run with --runslow or ADACS_RUN_SLOW=1")
    share_cores_between_workers()


def share_cores_between_workers() -> None:
    """Under pytest-xdist (``-n``), give each worker and the commands it starts its share of the cores.

    Two workers with torch's default of one thread per core would each spin on every core; an explicit
    ``OMP_NUM_THREADS`` is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("ADACS_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: run with --runslow or ADACS_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def shared_data(name: str) -> Path:
    """Path of a dataset under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need ../shared/data next to the repository")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine run several times faster on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load_repo_script(name: str):
    """Import a top-level ``scripts/<name>.py`` tool (run as files, not a package) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def ring_label(size: int, centre: tuple[float, float], radius: float):
    """A square label map: a myocardium ring (label 2, 3 px wide) around a blood pool disc (label 3), uint8."""
    import numpy as np

    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    distance = np.hypot(x - centre[0], y - centre[1])
    label = np.zeros((size, size), np.uint8)
    label[distance < radius + 3] = 2
    label[distance < radius] = 3
    return label


def write_ring_pairs(out: Path, sections: list[str], empty_es: tuple[int, ...] = ()) -> Path:
    """A prepared folder as scripts/prepare_*.py writes it: pair i of 32 x 32 goes to ``sections[i]``, its ES ring
    shifted by i % 3 rows and -1 column from the ED ring (pairs in ``empty_es`` get an empty ES label)."""
    import json

    import numpy as np

    common = load_repo_script("_prep_common")
    out.mkdir()
    content: dict[str, list] = {"training": [], "validation": [], "testing": []}
    for i, section in enumerate(sections):
        ed = ring_label(32, (16, 16), 6)
        es = ring_label(32, (16 + i % 3, 15), 5) if i not in empty_es else np.zeros((32, 32), np.uint8)
        pair = common.PairSlices(f"p{i}_slice00", f"p{i}", ed / 3.0 + 0.1, es / 3.0 + 0.1, ed, es, None)
        content[section].append(common.write_pair(pair, out))
    (out / "datalist.json").write_text(json.dumps(content))
    return out


def tiny_training(configs, tmp_path: Path, **overrides):
    """``train.yaml`` plus the override ``configs`` (names in ``bundle/configs``) as an initialised ``ConfigWorkflow``
    on a tiny phantom: 32 x 32, 4 training and 2 validation pairs, one epoch of 2 displacement micro-steps, no
    progress bar, outputs in ``tmp_path``; ``overrides`` change any config entry."""
    from monai.bundle import ConfigWorkflow

    settings = {"image_size": [32, 32], "num_train_pairs": 4, "num_val_pairs": 2, "epoch_length": 2, "batch_size": 2,
                "epochs": 1, "motion_warmup_epochs": 1, "scoring_warmup_epochs": 0, "num_workers": 0,
                "train#handler#progress_bar#_disabled_": True, **overrides}
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / "train.yaml"), *(str(BUNDLE / "configs" / c) for c in configs)],
        workflow_type="train", logging_file=False, bundle_root=str(BUNDLE), ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"), **settings,
    )
    workflow.initialize()
    return workflow
