"""tools/check_exact_float.py: the repository's tests pass it, and it rejects an unexplained exact float comparison."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "check_exact_float.py"


def _checker():
    spec = importlib.util.spec_from_file_location("check_exact_float", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(code: str) -> list[str]:
    return _checker().check_source(textwrap.dedent(code), "snippet.py")


def test_the_repository_tests_pass():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_file_fails_the_command_line(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import torch\n\n\ndef test_x(a, b):\n    assert torch.equal(a, b)\n")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "test_bad.py:5: equal()" in result.stdout
    assert "exact:" in result.stderr


@pytest.mark.parametrize(
    "line",
    [
        "assert torch.equal(a, b)",
        "assert not a.equal(b)",
        "torch.testing.assert_close(a, b, atol=0, rtol=0)",
        "torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)",
        "np.testing.assert_allclose(a, b, rtol=0)",
        "assert torch.allclose(a, b, rtol=0, atol=0)",
        "assert np.array_equal(a, b)",
        "np.testing.assert_array_equal(a, b)",
        "assert x == 0.5",
        "assert -1.5 != x",
        "assert loss.item() == ref",
        "assert y.tolist() == [1, 2]",
        "assert float(y) == z",
        "assert math.inf == y",
        "assert y.sum() == 2",
        "assert y.abs().max() == 0",
        "assert (a == b).all()",
        "assert torch.all(a == b)",
        "assert a.eq(b).all()",
    ],
)
def test_unexplained_exact_comparisons_are_reported(line):
    problems = _check(f"def test_x(a, b, x, y, z, loss, ref):\n    {line}\n")
    assert len(problems) == 1, problems
    assert problems[0].startswith("snippet.py:2: ")


@pytest.mark.parametrize(
    "code",
    [
        # the comment on the line
        "assert torch.equal(a, b)  # exact: same route (determinism of one call)\n",
        # the comment on the line just above
        "# exact: restored state\nassert torch.equal(a, b)\n",
        # a comment block right above
        "# exact: the chunking is fixed by the shapes, so every thread count\n# runs the same arithmetic\n"
        "assert torch.equal(a, b)\n",
        # a call spread over lines, the comment inside it
        "torch.testing.assert_close(\n    a, b, rtol=0, atol=0  # exact: same kernel\n)\n",
    ],
)
def test_comparisons_with_an_exact_comment_pass(code):
    assert _check(code) == []


def test_the_comment_must_be_on_the_line_or_just_above():
    assert len(_check("# exact: too far away\n\nassert torch.equal(a, b)\n")) == 1
    assert (
        len(_check("# exact: for the first\nx = 1  # a statement between\nassert torch.equal(a, b)\n")) == 1
    )
    assert len(_check("assert torch.equal(a, b)  # same route, but no marker\n")) == 1


@pytest.mark.parametrize(
    "line",
    [
        "torch.testing.assert_close(a, b, rtol=0, atol=1e-6)",  # a tolerance
        "torch.testing.assert_close(a, b)",  # torch's default tolerances
        "assert torch.allclose(a, b, atol=1e-8)",
        "assert x == pytest.approx(0.5)",
        "assert len(x) == 3",
        "assert x.shape == (2, 3)",
        "assert x.dtype == torch.float32",
        "assert x.numel() == 4",
        "assert n == 3",
        "assert name == 'w'",
        "assert x is None",
        "assert (mask == 3).all()",  # an integer count per element
        "assert (x != 0).sum() == 12",  # a count of a mask
        "assert ((x != 0).any(dim=1).sum(dim=1) == 2).all()",
        "assert (x < 1.5).all()",  # an inequality is a bound, not an equality
        "assert x <= 0.5",
    ],
)
def test_tolerances_counts_and_shapes_are_not_reported(line):
    assert _check(f"{line}\n") == []


def test_the_lint_session_runs_the_checker():
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    lint = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "lint")
    runs = [
        ast.unparse(call)
        for call in ast.walk(lint)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "session.run"
    ]
    assert any("check_exact_float.py" in run and run.startswith("session.run('python'") for run in runs), runs
