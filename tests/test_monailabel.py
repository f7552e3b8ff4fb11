"""The MONAI Label app (monailabel_app/): a real MONAI Label server on 127.0.0.1 with a tiny datastore; the
``adacs_propagation`` infer endpoint must return the ED label propagated onto the ES frame, identical to the
bundle's own registration engine.

monailabel lives in a separate venv (it pins packages /work/venv must not change); see monailabel_app/README.md.
Set ADACS_MONAILABEL_PYTHON to that venv's python (default /work/venv_ml/bin/python).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO

from scripts.networks import DiffeomorphicVoxelMorph
from scripts.registration_io import PairRegistration

ML_PYTHON = os.environ.get("ADACS_MONAILABEL_PYTHON", "/work/venv_ml/bin/python")


def _monailabel_python() -> str:
    if not os.path.isfile(ML_PYTHON):
        pytest.skip(f"{ML_PYTHON} does not exist: install monailabel in a separate venv (monailabel_app/README.md) "
                    "or set ADACS_MONAILABEL_PYTHON")
    probe = subprocess.run([ML_PYTHON, "-c", "import monailabel.app"], capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"monailabel is not importable with {ML_PYTHON}: {probe.stderr.strip().splitlines()[-1:]}")
    return ML_PYTHON


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, server: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"MONAI Label server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    raise AssertionError(f"MONAI Label server not up after {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A MONAI Label server on a one-case datastore (phantom ED/ES, the ED label final), with a random network."""
    python = _monailabel_python()
    tmp_path = tmp_path_factory.mktemp("monailabel")
    source = tmp_path / "source"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_phantom_nifti.py"), "--out", str(source),
                    "--num-pairs", "1", "--size", "112"], check=True, capture_output=True)
    store = tmp_path / "datastore"
    (store / "labels" / "final").mkdir(parents=True)
    case = "phantom300000"
    for phase in ("ED", "ES"):
        shutil.copy(source / f"{case}_{phase}.nii.gz", store / f"{case}_{phase}.nii.gz")
    shutil.copy(source / f"{case}_ED_gt.nii.gz", store / "labels" / "final" / f"{case}_ED.nii.gz")
    torch.manual_seed(0)
    net = DiffeomorphicVoxelMorph(head_init_std=1.0).eval()  # a visible deformation, not the identity
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)

    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(
        [python, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"), "--studies",
         str(store), "--conf", "model_path", str(ckpt), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/info/", process)
        yield {"url": f"http://127.0.0.1:{port}", "store": store, "source": source, "case": case, "net": net,
               "tmp": tmp_path}
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def _post(url: str) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=300) as response:
        return response.read()


@pytest.mark.slow  # starts a MONAI Label server (~1 min to import and start on a busy 2-core CPU)
def test_label_propagation_through_monailabel_server(server: dict) -> None:
    case, store, source, tmp_path, net = server["case"], server["store"], server["source"], server["tmp"], server["net"]
    (tmp_path / "result.nii.gz").write_bytes(_post(f"{server['url']}/infer/adacs_propagation?image={case}_ES&output=image"))
    result = nib.load(str(tmp_path / "result.nii.gz"))
    fixed = nib.load(str(store / f"{case}_ES.nii.gz"))
    assert result.shape == fixed.shape
    np.testing.assert_allclose(result.affine, fixed.affine)

    moving = nib.load(str(source / f"{case}_ED.nii.gz")).get_fdata(dtype=np.float32)
    moving_label = np.rint(nib.load(str(source / f"{case}_ED_gt.nii.gz")).get_fdata()).astype(np.int64)
    expected = PairRegistration(net, (128, 128))(moving[None], fixed.get_fdata(dtype=np.float32)[None],
                                                  moving_label[None], int(moving_label.max()) + 1)
    expected_label = expected.warped_label[0, 0].numpy()
    got = np.rint(result.get_fdata()).astype(np.int64)
    assert not np.array_equal(expected_label, moving_label), "the test field must move the label"
    assert np.mean(got == expected_label) > 0.999


@pytest.mark.slow
def test_strain_through_monailabel_server(server: dict) -> None:
    """adacs_strain: the AHA segments of the ED label on the ED geometry, and the strain at ES in the JSON result,
    equal to the bundle's strain analysis run in this process with the same network."""
    import json

    from scripts.strain_analysis import CineRegistration, analyse_case
    from scripts.strain_io import load_case

    case, store, tmp_path = server["case"], server["store"], server["tmp"]
    url = f"{server['url']}/infer/adacs_strain?image={case}_ED"
    (tmp_path / "segments.nii.gz").write_bytes(_post(url + "&output=image"))
    answer = json.loads(_post(url + "&output=json"))
    segments = nib.load(str(tmp_path / "segments.nii.gz"))
    ed = nib.load(str(store / f"{case}_ED.nii.gz"))
    assert segments.shape == ed.shape
    np.testing.assert_allclose(segments.affine, ed.affine)

    local = load_case({"case": case, "moving": str(store / f"{case}_ED.nii.gz"), "fixed": str(store / f"{case}_ES.nii.gz"),
                       "moving_label": str(store / "labels" / "final" / f"{case}_ED.nii.gz")})
    expected = analyse_case(local, CineRegistration(server["net"]).track(local, 2), {"rv": 1, "myo": 2, "lv": 3})
    got = np.rint(segments.get_fdata()).astype(np.int64).reshape(expected.segments.segments[0].shape)
    np.testing.assert_array_equal(got, expected.segments.segments[0])
    assert set(np.unique(got)) - {0} == set(range(7, 13)), "one slice: the six mid segments"
    params = answer.get("params", answer)
    for key in ("radial_green", "circumferential_green", "radial_engineering", "circumferential_engineering"):
        value = 100.0 * float(expected.global_curves[key][expected.es_index])
        assert params["global"][key] == pytest.approx(value, abs=0.02)
    assert set(params["segments"]) == {str(s) for s in range(7, 13)}


@pytest.mark.slow
def test_strain_request_errors_name_the_problem(server: dict) -> None:
    """A strain request on an image that is not an ED frame is refused, the server's log saying what to pass."""
    with pytest.raises(urllib.error.HTTPError) as raised:
        _post(f"{server['url']}/infer/adacs_strain?image={server['case']}_ES&output=json")
    assert raised.value.code >= 400  # MONAI Label 0.8.5 answers "Internal Server Error"; the reason is in its log
    deadline = time.time() + 30
    while "is not named <case>_ED" not in (log := (server["tmp"] / "server.log").read_text(errors="replace")):
        assert time.time() < deadline, log[-2000:]
        time.sleep(1)
    assert "pass the ES image id as 'fixed'" in log


@pytest.mark.slow
def test_app_builds_the_refiner_from_its_conf(tmp_path: Path) -> None:
    """``--conf refine_steps 5``: both tasks register with the bundle's test-time refiner (score-weighted, the
    shipped scoring weights); without it they do not refine."""
    python = _monailabel_python()
    probe = f'''
import sys
sys.path[:0] = [{str(REPO / "bundle")!r}, {str(REPO / "monailabel_app")!r}]
from main import refine_settings
from lib.propagation import LabelPropagationTask
from lib.strain import StrainTask
for steps in ("0", "5"):
    refine = refine_settings({{"refine_steps": steps}}, {str(REPO / "bundle")!r})
    for task in (LabelPropagationTask(lambda: None, {str(REPO / "bundle" / "models" / "model.pt")!r}),
                 StrainTask(lambda: None, {str(REPO / "bundle" / "models" / "model.pt")!r})):
        task.refine = refine
        engine = task._engine()
        print(type(task).__name__, steps, None if engine.refiner is None else engine.refiner.steps,
              None if engine.refiner is None else type(engine.refiner.scoring_network).__name__)
'''
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == ["LabelPropagationTask 0 None None", "StrainTask 0 None None",
                                          "LabelPropagationTask 5 5 ScoringNet", "StrainTask 5 5 ScoringNet"]


@pytest.mark.slow
def test_app_builds_each_backbone_from_its_conf(tmp_path: Path) -> None:
    """``--conf network_config backbone_<name>.yaml`` (every ``configs/backbone_*.yaml``): both tasks' network is
    that backbone with the weights of ``model_path`` (its field equals the eager network's here); a name that is no
    config stops the app, a grid the backbone cannot take and the inverse field of a one-way backbone are server
    errors naming the problem (``--conf strain_lagrangian swap``)."""
    from scripts.inference_engine import network_from_config

    python = _monailabel_python()
    backbones = sorted(p.name for p in (REPO / "bundle" / "configs").glob("backbone_*.yaml"))
    image = torch.rand((1, 2, 128, 128), generator=torch.Generator().manual_seed(0))
    torch.save(image, tmp_path / "image.pt")
    expected = {}
    for name in backbones:
        torch.manual_seed(0)
        net = network_from_config(name)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
            expected[name] = net.eval()(image)
        torch.save(net.state_dict(), tmp_path / f"{name}.pt")
    probe = f'''
import sys, torch
bundle, tmp = {str(REPO / "bundle")!r}, {str(tmp_path)!r}
sys.path[:0] = [bundle, {str(REPO / "monailabel_app")!r}]
from monailabel.interfaces.exception import MONAILabelException
from main import network_config
from lib.propagation import LabelPropagationTask
from lib.strain import StrainTask
try:
    network_config({{"network_config": "backbone_nothing.yaml"}}, bundle)
except ValueError as error:
    print("unknown:", error)
image = torch.load(tmp + "/image.pt")
for name in {backbones!r}:
    config = network_config({{"network_config": name}}, bundle)
    for size in (128, 100):
        task = LabelPropagationTask(lambda: None, f"{{tmp}}/{{name}}.pt", (size, size))
        task.bundle_path, task.network_config = bundle, config
        try:
            net = task._engine().network
        except MONAILabelException as error:
            print(name, size, "error:", error.msg)
            continue
        with torch.no_grad():
            torch.save(net(image), f"{{tmp}}/{{name}}.field.pt")
        print(name, size, type(net).__name__)
    for lagrangian in ("inverse", "swap"):
        strain = StrainTask(lambda: None, f"{{tmp}}/{{name}}.pt", lagrangian=lagrangian)
        strain.bundle_path, strain.network_config = bundle, config
        try:
            print(name, lagrangian, type(strain._engine().network).__name__)
        except MONAILabelException as error:
            print(name, lagrangian, "error:", error.msg)
'''
    result = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("unknown: backbone_nothing.yaml: network config not found") and backbones[0] in lines[0]
    for name in backbones:
        net = network_from_config(name)
        got = {tuple(line.split()[1:3]): line for line in lines[1:] if line.startswith(name + " ")}
        assert got[("128", type(net).__name__)]
        assert "error: image_size [100, 100] does not fit the displacement network" in got[("100", "error:")]
        torch.testing.assert_close(torch.load(tmp_path / f"{name}.field.pt"), expected[name], atol=1e-5, rtol=0)
        assert got[("swap", type(net).__name__)]
        if net.bidirectional:
            assert got[("inverse", type(net).__name__)]
        else:
            assert "--conf strain_lagrangian swap" in got[("inverse", "error:")]
