"""Let a session venv see the packages (torch above all) of the interpreter that runs nox.

``virtualenv --system-site-packages`` exposes the *base* interpreter's site-packages. When nox runs inside a venv or
a conda environment, which is where users install their torch, that torch stays invisible and every session would
install its own (a CUDA build is several GB). So session venvs are created plain, and get a ``.pth`` file listing the
site-packages directories of the interpreter that runs nox (venv, conda or system Python alike). Python appends those
directories to ``sys.path`` *after* the venv's own site-packages, so whatever a session installs wins, and pip sees
the outer packages as installed and does not fetch them again.

``noxfile.py`` imports this module; ``python tools/outer_site.py`` prints the directories as JSON (for tests).
"""

from __future__ import annotations

import importlib.util
import json
import site
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "_altgrad_outer_site.pth"
# The one torch install instruction; README.md, docs/index.md and every package's README and docs page say the same
# (tests/integration/test_docs.py checks it).
TORCH_INSTALL = (
    "Install the torch build you want first "
    "(CPU-only: `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`); "
    "otherwise pip picks one for you, usually a large CUDA build."
)


class TorchMissingError(RuntimeError):
    """torch is not importable by the interpreter that runs nox."""


def site_dirs() -> list[str]:
    """This interpreter's existing site-packages directories, in ``sys.path`` order first.

    The union of the ``site-packages``/``dist-packages`` entries of ``sys.path`` (venv, conda, Debian's
    dist-packages, a ``--system-site-packages`` venv's base), ``sysconfig``'s purelib/platlib,
    ``site.getsitepackages()`` and the user site when it is enabled.
    """
    paths = sysconfig.get_paths()
    candidates = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    candidates += [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    found: list[str] = []
    for p in candidates:
        resolved = str(Path(p).resolve())
        if Path(resolved).is_dir() and resolved not in found:
            found.append(resolved)
    return found


def torch_dirs() -> list[str]:
    """``site_dirs()`` plus, when torch lives elsewhere on ``sys.path`` (``PYTHONPATH``), the directory holding it.

    Raises :class:`TorchMissingError` with the command to run when this interpreter cannot import torch.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise TorchMissingError(
            f"torch is not installed for {sys.executable}, the Python that runs nox, and every session reuses "
            f"that torch. {TORCH_INSTALL} Install it with that Python (`{sys.executable} -m pip install ...`)."
        )
    dirs = site_dirs()
    holder = str(Path(spec.origin).resolve().parent.parent)
    if holder not in dirs:
        dirs.append(holder)
    return dirs


def write_pth(purelib: str | Path, dirs: list[str]) -> Path:
    """Write the ``.pth`` file listing ``dirs`` into a venv's ``purelib`` directory and return its path."""
    path = Path(purelib) / PTH_NAME
    path.write_text("".join(f"{d}\n" for d in dirs))
    return path


if __name__ == "__main__":
    print(json.dumps(site_dirs()))
