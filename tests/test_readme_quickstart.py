"""The README's Quick start: its two commands, run one after the other in one shell from the repository root, each
find the files they name (issue 31 item 1: the first used to leave the shell in bundle/, so the second could not
open requirements-dev.txt).

``pip`` and ``python`` are shell functions here that record their working directory and check the files they are
given, so the test runs in a second and installs or trains nothing; the commands themselves are taken verbatim
from the README."""

from __future__ import annotations

import re
import subprocess

from conftest import REPO

FAKES = r'''
pip() {  # check every -r file exists where pip runs
  while [ $# -gt 0 ]; do
    if [ "$1" = "-r" ]; then [ -f "$2" ] || { echo "pip: cannot open $2 in $PWD" >&2; return 1; }; fi
    shift
  done
  echo "pip ran in $PWD"
}
python() {  # check the config or the test folder exists where python runs
  for arg in "$@"; do
    case "$arg" in configs/*|tests) [ -e "$arg" ] || { echo "python: no $arg in $PWD" >&2; return 1; } ;; esac
  done
  echo "python $1 $2 ran in $PWD"
}
'''


def quickstart_commands() -> list[str]:
    section = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_quickstart_has_two_commands() -> None:
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "monai.bundle run" in commands[0] and "pytest" in commands[1]


def test_quickstart_commands_run_in_sequence_from_the_repository_root() -> None:
    script = FAKES + "set -e\n" + "\n".join(quickstart_commands()) + '\necho "ended in $PWD"\n'
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"python -m monai.bundle ran in {REPO / 'bundle'}" in lines  # the bundle command runs inside bundle/
    assert f"python -m pytest ran in {REPO}" in lines  # the tests from the root
    assert lines[-1] == f"ended in {REPO}"  # the shell is back where it started
