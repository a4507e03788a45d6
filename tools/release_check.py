"""Release checks shared by `.github/workflows/release.yml` and `nox -s release` (one source of truth).

    python tools/release_check.py parse-tag altgrad-sign-optim-v0.3.0
        prints name=, dist=, version=, compiled= lines (for $GITHUB_OUTPUT); fails on a malformed tag, an unknown
        package or a version that is not in PEP 440 normal form.
    python tools/release_check.py changelog NAME VERSION
        fails unless packages/NAME/CHANGELOG.md has a `## [VERSION]` section (the release's notes).
    python tools/release_check.py artifacts DIR NAME VERSION [--wheel-platforms P ...]
        fails unless DIR holds exactly one sdist and at least one wheel of package NAME, all at VERSION (file names
        and the metadata inside), each carrying the LICENSE file and the MIT license expression, and no compiled
        wheel with a bare `linux_*` tag (PyPI rejects those; they need auditwheel). With --wheel-platforms, a wheel
        for each platform-tag substring given (e.g. manylinux_2_28_x86_64 macosx_11_0_arm64 win_amd64) must exist;
        with --sdist-only, DIR must hold the sdist alone (the compiled package's wheels come later from it);
        with --others-ok, files of other distributions in DIR are ignored (`nox -s build` puts all in one dist/).

Needs Python >= 3.10 and `packaging`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TAG_RE = re.compile(r"^altgrad-(?P<name>[a-z0-9]+(?:-[a-z0-9]+)*?)-v(?P<version>[0-9].*)$")
LICENSE_EXPRESSION = "MIT"


class ReleaseError(Exception):
    """A release check failed; the message says which and why."""


def parse_tag(tag: str, root: Path = ROOT) -> dict[str, str]:
    """Map a tag ``altgrad-<name>-v<version>`` to the package it releases."""
    m = TAG_RE.match(tag)
    if not m:
        raise ReleaseError(f"tag {tag!r}: expected altgrad-<name>-v<version>, e.g. altgrad-sign-optim-v0.3.0")
    name, version = m["name"], m["version"]
    pyproject = root / "packages" / name / "pyproject.toml"
    if not pyproject.is_file():
        known = sorted(p.parent.name for p in root.glob("packages/*/pyproject.toml"))
        raise ReleaseError(f"tag {tag!r}: no package {name!r} under packages/ (expected one of {known})")
    try:
        normal = str(Version(version))
    except InvalidVersion:
        raise ReleaseError(f"tag {tag!r}: {version!r} is not a PEP 440 version") from None
    if normal != version or Version(version).local is not None:
        raise ReleaseError(f"tag {tag!r}: write the version in normal form without a local part ({normal!r})")
    data = tomllib.loads(pyproject.read_text())
    return {
        "name": name,
        "dist": data["project"]["name"],
        "version": version,
        "compiled": str("scikit-build" in data.get("tool", {})).lower(),  # as noxfile.py decides it
    }


def check_changelog(name: str, version: str, root: Path = ROOT) -> str:
    """Check that ``packages/<name>/CHANGELOG.md`` has a ``## [<version>]`` section and return its heading."""
    path = root / "packages" / name / "CHANGELOG.md"
    if not path.is_file():
        raise ReleaseError(f"packages/{name}/CHANGELOG.md does not exist")
    heading = re.compile(rf"^## \[{re.escape(version)}\](?:\s|$)")
    for line in path.read_text().splitlines():
        if heading.match(line):
            return line
    raise ReleaseError(
        f"packages/{name}/CHANGELOG.md has no '## [{version}]' section: move the 'Unreleased' entries under "
        f"'## [{version}] - <YYYY-MM-DD>' in the commit that gets the tag (docs/releasing.md, step 1)"
    )


def _metadata(text: str) -> dict[str, list[str]]:
    msg = HeaderParser().parsestr(text)
    out: dict[str, list[str]] = {}
    for key, value in msg.items():
        out.setdefault(key, []).append(value)
    return out


def _check_metadata(label: str, meta: dict[str, list[str]], dist: str, version: str) -> None:
    def one(key: str) -> str:
        values = meta.get(key, [])
        if len(values) != 1:
            raise ReleaseError(f"{label}: expected one {key} header, found {values}")
        return values[0]

    if canonicalize_name(one("Name")) != canonicalize_name(dist):
        raise ReleaseError(f"{label}: metadata Name is {one('Name')!r}, expected {dist!r}")
    if one("Version") != version:
        raise ReleaseError(f"{label}: metadata Version is {one('Version')!r}, expected {version!r} (the tag)")
    if one("License-Expression") != LICENSE_EXPRESSION:
        raise ReleaseError(f"{label}: License-Expression is {one('License-Expression')!r}")
    if meta.get("License-File") != ["LICENSE"]:
        raise ReleaseError(
            f"{label}: License-File headers are {meta.get('License-File')}, expected ['LICENSE']"
        )
    if one("Description-Content-Type") != "text/markdown":
        raise ReleaseError(f"{label}: the readme is not declared as markdown")


def check_artifacts(
    directory: Path,
    name: str,
    version: str,
    wheel_platforms: list[str] | None = None,
    sdist_only: bool = False,
    others_ok: bool = False,
) -> list[str]:
    """Check every artifact in ``directory`` for package ``name`` at ``version``; return a line per file."""
    dist = f"altgrad-{name}"
    files = sorted(p for p in directory.iterdir() if p.is_file())
    if others_ok:
        files = [p for p in files if p.name.startswith(dist.replace("-", "_") + "-")]
    sdists = [p for p in files if p.name.endswith(".tar.gz")]
    wheels = [p for p in files if p.name.endswith(".whl")]
    stray = [p.name for p in files if p not in sdists and p not in wheels]
    if stray:
        raise ReleaseError(f"{directory}: unexpected files {stray}")
    if len(sdists) != 1 or bool(wheels) == sdist_only:
        expected = "the sdist alone" if sdist_only else "one sdist and at least one wheel"
        raise ReleaseError(f"{directory}: expected {expected}, found {[p.name for p in files]}")
    report = []
    for sdist in sdists:
        sname, sversion = parse_sdist_filename(sdist.name)
        if sname != canonicalize_name(dist) or str(sversion) != version:
            raise ReleaseError(f"{sdist.name}: expected {dist} {version}")
        base = sdist.name.removesuffix(".tar.gz")
        with tarfile.open(sdist) as tf:
            names = set(tf.getnames())
            for need in ("PKG-INFO", "LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml"):
                if f"{base}/{need}" not in names:
                    raise ReleaseError(f"{sdist.name}: lacks {need}")
            member = tf.extractfile(f"{base}/PKG-INFO")
            assert member is not None
            _check_metadata(sdist.name, _metadata(member.read().decode()), dist, version)
        report.append(f"{sdist.name}: version, license and readme metadata ok")
    for wheel in wheels:
        wname, wversion, _build, tags = parse_wheel_filename(wheel.name)
        if wname != canonicalize_name(dist) or str(wversion) != version:
            raise ReleaseError(f"{wheel.name}: expected {dist} {version}")
        bare = [t.platform for t in tags if t.platform.startswith("linux_")]
        if bare:
            raise ReleaseError(
                f"{wheel.name}: platform tag {bare[0]} is not uploadable; repair it with auditwheel"
            )
        info = f"{dist.replace('-', '_')}-{version}.dist-info"
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            if f"{info}/licenses/LICENSE" not in names:
                raise ReleaseError(f"{wheel.name}: lacks {info}/licenses/LICENSE")
            _check_metadata(wheel.name, _metadata(zf.read(f"{info}/METADATA").decode()), dist, version)
        report.append(f"{wheel.name}: version, license and readme metadata ok")
    for platform in wheel_platforms or []:
        if not any(platform in w.name for w in wheels):
            raise ReleaseError(f"{directory}: no wheel for platform {platform}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_tag = sub.add_parser("parse-tag")
    p_tag.add_argument("tag")
    p_log = sub.add_parser("changelog")
    p_log.add_argument("name")
    p_log.add_argument("version")
    p_art = sub.add_parser("artifacts")
    p_art.add_argument("directory", type=Path)
    p_art.add_argument("name")
    p_art.add_argument("version")
    p_art.add_argument("--wheel-platforms", nargs="*", default=[])
    p_art.add_argument("--sdist-only", action="store_true")
    p_art.add_argument("--others-ok", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "parse-tag":
            for key, value in parse_tag(args.tag).items():
                print(f"{key}={value}")
        elif args.cmd == "changelog":
            print(f"packages/{args.name}/CHANGELOG.md: {check_changelog(args.name, args.version)}")
        else:
            for line in check_artifacts(
                args.directory, args.name, args.version, args.wheel_platforms, args.sdist_only, args.others_ok
            ):
                print(line)
    except ReleaseError as exc:
        print(f"release check failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
