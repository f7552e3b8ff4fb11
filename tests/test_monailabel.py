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
