"""Loading the reference implementation that `pare parity` compares against.

This is the one place in pare that touches diffusers, and it does so on purpose and at run
time only: the reference may be the installed diffusers or a source tree given by path (a
contributor's working copy), and the same code must import either. `import pare` and every
model, scheduler and pipeline work without diffusers installed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

REFERENCE_PACKAGE = "diffusers"


def import_reference(path: str | Path | None = None) -> ModuleType:
    """The installed diffusers, or the one in `path` (a checkout: `path/src/diffusers`, or `path/diffusers`)."""
    if path is None:
        try:
            return importlib.import_module(REFERENCE_PACKAGE)
        except ImportError as e:
            raise ImportError(
                f"`pare parity` compares against {REFERENCE_PACKAGE}, which is not installed: "
                f"pip install 'pare[test]' (pins diffusers==0.42.1) or pass --reference-path"
            ) from e

    root = Path(path).expanduser().resolve()
    candidates = [root / "src", root]
    parent = next((c for c in candidates if (c / REFERENCE_PACKAGE / "__init__.py").is_file()), None)
    if parent is None:
        raise FileNotFoundError(f"--reference-path {root}: no {REFERENCE_PACKAGE}/__init__.py under {[str(c) for c in candidates]}")
    loaded = sys.modules.get(REFERENCE_PACKAGE)
    if loaded is not None and Path(loaded.__file__).resolve().parent.parent != parent:
        # A second diffusers cannot be imported beside the first in one process.
        raise RuntimeError(
            f"{REFERENCE_PACKAGE} is already imported from {loaded.__file__}; run `pare parity --reference-path` "
            "in a fresh process"
        )
    sys.path.insert(0, str(parent))
    module = importlib.import_module(REFERENCE_PACKAGE)
    if Path(module.__file__).resolve().parent.parent != parent:
        raise RuntimeError(f"imported {REFERENCE_PACKAGE} from {module.__file__}, not from {parent}")
    return module
