"""Issue 31 (a new user's first hour): every command the README shows works from where the user stands.

* ``test_every_readme_command_runs_where_the_readme_puts_the_shell``: all of the README's ``bash`` blocks, in order,
  in one shell started at the repository root (``cd`` lines included), with ``python`` / ``pip`` / ``torchrun``
  replaced by a checker: a bundle command must run in ``bundle/`` (or with ``PYTHONPATH`` naming it) and find its
  configs, a repository tool must run from the root and exist, ``pip -r`` files must exist.
* ``test_readme_commands_for_real_in_sequence``: in a scratch copy of the repository, the Quick start's training
  (shortened by an override), then the README's evaluate, inference and strain commands, as written (placeholders
  replaced by phantom NIfTI folders), one after the other from the root; then a bundle command from the root
  without and with the ``PYTHONPATH`` form.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

CHECKER = r'''
import ast, os, sys
log, cwd, program, *args = sys.argv[1:]
repo = os.environ["README_REPO"]
bundle = os.path.join(repo, "bundle")

def fail(why):
    open(log, "a").write(f"FAIL {program} {' '.join(args)} in {cwd}: {why}\n")
    sys.exit(1)

def configs(value):
    return ast.literal_eval(value) if value.startswith("[") else [value]

if program == "pip":
    for flag, value in zip(args, args[1:]):
        if flag == "-r" and not os.path.isfile(os.path.join(cwd, value)):
            fail(f"no {value}")
elif "monai.bundle" in args:
    on_path = os.path.realpath(cwd) == os.path.realpath(bundle) or any(
        os.path.realpath(os.path.join(cwd, p)) == os.path.realpath(bundle)
        for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    if not on_path:
        fail("the bundle's scripts package is not importable here")
    for flag, value in zip(args, args[1:]):
        if flag == "--config_file":
            for config in configs(value):
                if not os.path.isfile(os.path.join(cwd, config)):
                    fail(f"no {config}")
elif args[:2] == ["-m", "pytest"]:
    if not os.path.isdir(os.path.join(cwd, args[-1])):
        fail(f"no {args[-1]}")
elif args and args[0].startswith("scripts/"):
    if os.path.realpath(cwd) != os.path.realpath(repo) or not os.path.isfile(os.path.join(cwd, args[0])):
        fail(f"{args[0]} is not a repository tool here")
else:
    fail("a command this checker does not know")
open(log, "a").write(f"ok {program} {' '.join(args[:4])} in {cwd}\n")
'''


def readme_blocks() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", REPO.joinpath("README.md").read_text(), flags=re.S)


def test_every_readme_command_runs_where_the_readme_puts_the_shell(tmp_path: Path) -> None:
    checker, log = tmp_path / "checker.py", tmp_path / "log.txt"
    checker.write_text(CHECKER)
    check = f"{shlex.quote(sys.executable)} {shlex.quote(str(checker))} {shlex.quote(str(log))} \"$PWD\""
    shims = "\n".join(f'{name}() {{ {check} {name} "$@"; }}' for name in ("python", "pip", "torchrun"))
    script = shims + "\nset -e\n" + "\n".join(readme_blocks()) + '\necho "ended in $PWD"\n'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "README_REPO": str(REPO)})
    lines = log.read_text().splitlines() if log.exists() else []
    assert result.returncode == 0 and not any(line.startswith("FAIL") for line in lines), (lines, result.stderr)
    assert result.stdout.splitlines()[-1] == f"ended in {REPO}"  # every block leaves the shell at the root
    bundle_runs = [line for line in lines if "monai.bundle" in line]
    tools = [line for line in lines if " scripts/" in line]
    assert len(bundle_runs) >= 15 and len(tools) >= 3, lines  # the usage block, plug and play, the experiment


def test_the_checker_catches_a_command_run_from_the_wrong_folder(tmp_path: Path) -> None:
    """The checker can fail: the old README (bundle commands with no ``cd bundle``) is caught."""
    checker, log = tmp_path / "checker.py", tmp_path / "log.txt"
    checker.write_text(CHECKER)
    result = subprocess.run([sys.executable, str(checker), str(log), str(REPO), "python", "-m", "monai.bundle", "run",
                             "--config_file", "configs/inference.yaml"], env={**os.environ, "README_REPO": str(REPO)})
    assert result.returncode == 1 and "not importable here" in log.read_text()


# ------------------------------------------------------------------------------------------------ for real
SHORT_TRAINING = ("--epochs 2 --epoch_length 2 --num_train_pairs 4 --num_val_pairs 2 --motion_warmup_epochs 1 "
                  "--scoring_warmup_epochs 0 --image_size [64,64] --log_every 1")


def scratch_copy(root: Path) -> Path:
    """The repository as a fresh clone has it (no trained runs, no outputs)."""
    repo = root / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "eval", "phantom", "own", ".pytest_cache", "*.ts")
    for name in ("bundle", "scripts"):
        shutil.copytree(REPO / name, repo / name, ignore=ignore)
    for name in ("README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(REPO / name, repo / name)
    return repo


def usage_command(fragment: str) -> str:
    """The one README line that contains ``fragment`` (a bundle command of the usage block)."""
    lines = [line for block in readme_blocks() for line in block.splitlines() if fragment in line]
    assert len(lines) == 1, (fragment, lines)
    return lines[0]


def test_readme_commands_for_real_in_sequence(tmp_path: Path) -> None:
    repo = scratch_copy(tmp_path)
    pairs, cases = tmp_path / "pairs", tmp_path / "cases"
    for folder in (pairs, cases):
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_phantom_nifti.py"), "--out", str(folder),
                        "--num-pairs", "2", "--size", "80"], check=True, capture_output=True)
    quick_start = readme_blocks()[0].replace("configs/train.yaml)", f"configs/train.yaml {SHORT_TRAINING})")
    assert SHORT_TRAINING in quick_start
    evaluate_shipped = [line for line in readme_blocks()[2].splitlines()
                        if line.rstrip().endswith("configs/evaluate.yaml']\"")]  # no options: the defaults
    assert len(evaluate_shipped) == 1
    evaluate_trained = usage_command("--ckpt_path models/phantom/model.pt")
    inference = usage_command("configs/inference.yaml --dataset_dir /path/to/pairs")
    strain = usage_command("configs/strain.yaml --dataset_dir /path/to/cases")
    quick = " --num_test_pairs 2 --image_size [64,64]"
    steps = [
        'pip() { echo "pip skipped"; }',  # the environment is already installed
        f"python() {{ {shlex.quote(sys.executable)} \"$@\"; }}",
        "export OMP_WAIT_POLICY=PASSIVE",
        quick_start,
        'echo "after the quick start: $PWD"',
        "cd bundle",
        evaluate_shipped[0] + quick,
        evaluate_trained + quick,
        inference.replace("/path/to/pairs", str(pairs)) + " --progress false",
        "set +e",
        inference.replace("/path/to/pairs", str(pairs)) + " --progress false; echo \"second run: exit $?\"",
        "set -e",
        inference.replace("/path/to/pairs", str(pairs)) + " --progress false --overwrite true",
        strain.replace("/path/to/cases", str(cases)) + " --progress false --figures false",
        "cd ..",
    ]
    script = "set -e\n" + "\n".join(steps) + "\n"
    result = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert f"after the quick start: {repo}" in log  # the Quick start leaves the shell at the root
    assert (repo / "bundle" / "models" / "phantom" / "model.pt").is_file()
    assert "Restored all variables from ./models/model.pt\n" in log  # evaluate: the shipped weights by default
    assert "Restored all variables from models/phantom/model.pt\n" in log  # ... or the ones given
    assert (repo / "bundle" / "eval" / "metrics.csv").is_file()
    registered = tmp_path / "pairs_registered"  # beside the input folder, not in the bundle
    assert f"2 of 2 pairs registered into {registered}" in log
    assert "holds 9 outputs of an earlier run" in log and "second run: exit 1" in log
    assert sorted(p.name for p in registered.iterdir()) == sorted(
        [f"phantom30000{i}{s}" for i in (0, 1) for s in ("_ddf.nii.gz", "_ddf_itk.nii.gz", "_warped.nii.gz",
                                                         "_warped_gt.nii.gz")] + ["summary.csv"])
    assert (tmp_path / "cases_strain" / "strain_summary.csv").is_file()
    assert not (repo / "bundle" / "eval" / "inference").exists() and not (repo / "bundle" / "eval" / "strain").exists()

    # a bundle command from the root: one clear line; the README's PYTHONPATH form works
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.yaml",
               "--dataset_dir", str(pairs), "--output_dir", str(tmp_path / "from_root"), "--progress", "false"]
    plain = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and "run bundle commands from the bundle folder (cd bundle)" in plain.stderr
    assert "Traceback" not in plain.stderr and not (tmp_path / "from_root").exists()
    documented = subprocess.run(command + ["--bundle_root", "bundle"], cwd=repo, capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PYTHONPATH": "bundle"})
    assert documented.returncode == 0, documented.stderr[-3000:]
    assert (tmp_path / "from_root" / "summary.csv").is_file()


def test_evaluate_config_names_the_shipped_weights() -> None:
    """Issue 31 item 3: evaluate.yaml used to load <ckpt_dir>/model.pt = models/phantom/model.pt."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle/configs/train.yaml"), str(REPO / "bundle/configs/evaluate.yaml")])
    parser["bundle_root"] = str(REPO / "bundle")
    ckpt = Path(parser.get_parsed_content("ckpt_path"))
    assert ckpt == REPO / "bundle" / "models" / "model.pt" and ckpt.is_file()
    loader = parser.get("validate#handlers")[0]
    assert loader["load_path"] == "@ckpt_path"


@pytest.mark.parametrize("configs", ["bundle/configs/train.yaml", "['bundle/configs/train.yaml','bundle/configs/evaluate.yaml']",
                                     "bundle/configs/strain.yaml"], ids=["train", "evaluate", "strain"])
def test_a_bundle_config_run_from_the_root_says_where_to_run_it(configs: str, tmp_path: Path) -> None:
    """Issue 31 item 1: from the repository root these ended in "Cannot locate ... scripts.registration_io" tracebacks."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--output_dir",
                             str(tmp_path / "out"), "--dataset_dir", str(tmp_path / "none")], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the bundle package scripts is not importable from {REPO}: run bundle commands from the bundle folder "
        "(cd bundle), or elsewhere with PYTHONPATH=<bundle folder> and --bundle_root <bundle folder>.")
