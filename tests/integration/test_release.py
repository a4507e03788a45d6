"""Release readiness (docs/releasing.md): licence and changelog files, metadata, sibling pins, tag parsing, workflows.

Static checks of the repository plus the installed sibling versions; the release pipeline itself is exercised by
``nox -s release -- <name> <version>`` (too slow for the test suite: it builds in a fresh clone).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]  # requires-python >= 3.10; what ci.yml and cibuildwheel cover


def _project(pkg_dir: Path) -> dict:
    return tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]


def _release_check():
    spec = importlib.util.spec_from_file_location("release_check", ROOT / "tools" / "release_check.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_license_and_changelog(pkg_dir):
    assert (pkg_dir / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    changelog = (pkg_dir / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert "keepachangelog.com" in changelog


@pytest.mark.parametrize("pkg_dir", PACKAGE_DIRS, ids=lambda p: p.name)
def test_metadata_complete(pkg_dir):
    project = _project(pkg_dir)
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md"
    assert project["requires-python"] == ">=3.10"
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
    classifiers = project["classifiers"]
    assert not [c for c in classifiers if c.startswith("License ::")]  # PEP 639: the expression replaces them
    for version in PYTHONS:
        assert f"Programming Language :: Python :: {version}" in classifiers
    assert "Typing :: Typed" in classifiers
    torch = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch"]
    assert [str(r.specifier) for r in torch] == [">=2.5"]  # the tested floor (docs/releasing.md)


def _sibling_requirements():
    dists = {_project(d)["name"] for d in PACKAGE_DIRS}
    for pkg_dir in PACKAGE_DIRS:
        for raw in _project(pkg_dir).get("dependencies", []):
            req = Requirement(raw)
            if req.name in dists:
                yield pytest.param(req, id=f"{pkg_dir.name}->{req.name}")


@pytest.mark.parametrize("req", list(_sibling_requirements()))
def test_sibling_pin_is_one_minor_train(req):
    # ">=X.Y.Z.dev0,<next": the lower bound admits the train's development builds; the upper bound is the next
    # minor for 0.x (where minors may break) and the next major from 1.0 on.
    specs = {s.operator: Version(s.version) for s in req.specifier}
    assert set(specs) == {">=", "<"}, req
    low, high = specs[">="], specs["<"]
    assert low.dev == 0, f"{req}: the lower bound must end in .dev0"
    assert low.pre is None, req
    if low.major == 0:
        train = (0, low.minor if low.minor > 0 else 1)  # 0.0.1.dev0 is the untagged start of the 0.1 train
        assert high.release == (0, train[1] + 1), f"{req}: upper bound must be the next minor"
    else:
        assert high.release == (low.major + 1,), f"{req}: upper bound must be the next major"


@pytest.mark.parametrize("req", list(_sibling_requirements()))
def test_installed_sibling_satisfies_pin(req):
    installed = importlib.metadata.version(req.name)
    assert req.specifier.contains(installed, prereleases=True), (
        f"{req.name} {installed} does not satisfy {req}"
    )


def test_release_tags_parse():
    rc = _release_check()
    assert rc.parse_tag("altgrad-sign-optim-v0.3.0") == {
        "name": "sign-optim",
        "dist": "altgrad-sign-optim",
        "version": "0.3.0",
        "compiled": "false",
    }
    assert rc.parse_tag("altgrad-discounted-cumsum-v1.0.0rc1")["compiled"] == "true"
    for bad in [
        "altgrad-sign-optim-0.3.0",
        "altgrad-nope-v1.0.0",
        "altgrad-dni-v1.0.0-rc1",
        "altgrad-dni-v1.0+x",
    ]:
        with pytest.raises(rc.ReleaseError):
            rc.parse_tag(bad)


def test_workflows_release_by_tag_with_trusted_publishing():
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert re.search(r'tags: \["altgrad-\*-v\*"\]', release)
    assert "pypa/gh-action-pypi-publish" in release
    assert release.count("id-token: write") == 1  # only the publish job may mint a token
    assert "secrets." not in release  # no API tokens: trusted publishing only
    ci = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert "nox -s lint tests docs" in ci
    assert "pull_request" in ci


def test_release_fails_without_a_changelog_section(tmp_path):
    """A tag whose version has no ``## [<version>]`` in the package's CHANGELOG.md fails the release (plan job)."""
    rc = _release_check()
    pkg = tmp_path / "packages" / "sign-optim"
    pkg.mkdir(parents=True)
    log = pkg / "CHANGELOG.md"
    log.write_text(
        "# Changelog\n\n## [Unreleased]\n\n## [0.3.0rc1] - 2026-01-02\n\n## [0.2.0] - 2026-01-01\n"
    )
    for missing in ("0.3.0", "0.2", "0.2.0.post1"):
        with pytest.raises(rc.ReleaseError, match=re.escape(f"has no '## [{missing}]' section")):
            rc.check_changelog("sign-optim", missing, tmp_path)
    assert rc.check_changelog("sign-optim", "0.2.0", tmp_path) == "## [0.2.0] - 2026-01-01"
    assert rc.check_changelog("sign-optim", "0.3.0rc1", tmp_path) == "## [0.3.0rc1] - 2026-01-02"
    with pytest.raises(rc.ReleaseError, match="does not exist"):
        rc.check_changelog("dni", "0.1.0", tmp_path)
    # the command line the workflow runs exits non-zero and says why
    assert rc.main(["changelog", "sign-optim", "9.9.9"]) == 1
    release = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    plan = release[release.index("  plan:") : release.index("  sdist:")]
    assert (
        'python tools/release_check.py changelog "${{ steps.tag.outputs.name }}" "${{ steps.tag.outputs.version }}"'
        in plan
    )
    noxfile = (ROOT / "noxfile.py").read_text()
    assert "release_check.check_changelog(name, version, ROOT)" in noxfile  # the dry run runs the same check
    assert "THE REAL RELEASE WOULD FAIL" in noxfile
