"""How the repository's tools use the AdaCS bundle: one place puts ``bundle/`` on the import path.

The tools run as files (``python scripts/<tool>.py``), so Python finds this module next to them, as it finds
``_prep_common.py``. A tool that needs the bundle's code starts with

    from _bundle import BUNDLE, import_bundle

    import_bundle()
    from scripts.networks import DiffeomorphicVoxelMorph  # noqa: E402

after which ``scripts`` is the bundle's package (``bundle/scripts``), the one ``python -m monai.bundle run`` uses from
the bundle root. Tests that import a tool in-process put this folder on the path first, as running the file does.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"


def import_bundle() -> ModuleType:
    """The bundle's ``scripts`` package, its folder put first on ``sys.path`` if it is not there yet.

    Raises ImportError when another ``scripts`` package was imported before (its ``from scripts.x import``s would
    not be the bundle's code).
    """
    if str(BUNDLE) not in sys.path:
        sys.path.insert(0, str(BUNDLE))
    package = importlib.import_module("scripts")
    found = Path(getattr(package, "__file__", None) or "?").resolve().parent
    if found != BUNDLE / "scripts":
        raise ImportError(f"the module `scripts` was imported from {found}, not from the bundle {BUNDLE / 'scripts'}: "
                          "import the bundle before anything else named `scripts`")
    return package
