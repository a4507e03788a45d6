"""A build from an sdist takes the version in the sdist's PKG-INFO, wherever the sdist is unpacked.

setuptools-scm looks for git at ``root = "../.."`` before it reads PKG-INFO. An sdist unpacked two levels below
the top of *another* git repository (a vendoring monorepo, a CI checkout) would otherwise take its version from
that repository's tags: ``altgrad-dni-v9.9.9`` there became the version (issue 12, item 12).

Needs ``build`` (installed in the nox sessions) and an index for the isolated build environments.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import pytest

build_util = pytest.importorskip("build.util")

ROOT = Path(__file__).resolve().parents[2]
BOGUS = "9.9.9"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _sdist_in_foreign_repo(pkg: str, tmp: Path) -> tuple[Path, str]:
    """Build ``pkg``'s sdist, unpack it two levels below a git repo tagged ``altgrad-<pkg>-v9.9.9``."""
    out = tmp / "sdist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT / "packages" / pkg)],
        check=True,
        capture_output=True,
    )
    (sdist,) = out.glob("*.tar.gz")
    foreign = tmp / "foreign"
    (foreign / "vendor").mkdir(parents=True)
    _git(foreign, "init", "-q")
    (foreign / "README").write_text("another project\n")
    _git(foreign, "add", "README")
    _git(foreign, "commit", "-q", "-m", "init")
    _git(foreign, "tag", f"altgrad-{pkg}-v{BOGUS}")
    with tarfile.open(sdist) as tf:
        tf.extractall(foreign / "vendor", filter="data")
    (project,) = (foreign / "vendor").iterdir()
    assert (project / ".." / "..").resolve() == foreign.resolve()  # exactly where root = "../.." points
    version = HeaderParser().parsestr((project / "PKG-INFO").read_text())["Version"]
    assert version != BOGUS
    return project, version


def test_pure_package_wheel_from_sdist_in_foreign_repo(tmp_path):
    project, version = _sdist_in_foreign_repo("dni", tmp_path)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(project)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    assert wheel.name.split("-")[1] == version.replace("-", "_")
    with zipfile.ZipFile(wheel) as zf:
        assert f"'{version}'" in zf.read("altgrad/dni/_version.py").decode()


def test_compiled_package_metadata_from_sdist_in_foreign_repo(tmp_path):
    """scikit-build-core's setuptools-scm provider; metadata only (prepare_metadata_for_build_wheel, no compile)."""
    project, version = _sdist_in_foreign_repo("discounted-cumsum", tmp_path)
    assert build_util.project_wheel_metadata(project)["Version"] == version
