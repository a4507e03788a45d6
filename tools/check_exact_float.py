"""Report exact floating-point comparisons in tests that carry no ``exact:`` comment.

Two different arithmetic routes (a fused kernel and a reference expression, a vectorised and a loop path, two
thread counts, two CPU ISAs) round differently, so tests compare them with a tolerance derived from an error
bound. A bit-for-bit comparison is only right when both sides come from the same route (determinism of one call,
a restored state, a bit-parity the code guarantees by construction); such a line, or the comment line(s) just
above it, carries a comment containing ``exact:`` that says which.

Flagged (stdlib ``ast``; a heuristic, so when in doubt a site gets a comment such as ``# exact: integer-valued``):

* ``torch.equal(a, b)`` and ``a.equal(b)``;
* ``np.array_equal``, ``np.array_equiv``, ``np.testing.assert_array_equal``, ``np.testing.assert_equal``;
* ``assert_close``/``assert_allclose``/``allclose``/``isclose`` whose tolerance keywords (``atol``, ``rtol``,
  ``abs_tol``, ``rel_tol``) are all given as ``0``/``0.0`` (at least one given);
* ``(a == b).all()``, ``torch.all(a == b)``, ``a.eq(b).any()`` ... unless a side is an integer literal;
* ``==``/``!=`` where an operand is a float literal (also inside a list/tuple), ``float(...)``, ``.item()``,
  ``.tolist()``, ``.numpy()``, ``math.<name>`` or a reduction such as ``x.sum()`` / ``x.max()`` (not of a mask),
  unless an operand is ``pytest.approx(...)``, a string or ``None``. Counts, shapes and dtypes (``len()``,
  ``.shape``, ``.numel()``, ``.dtype``, ``(x != 0).sum()``) are not flagged.

Usage: ``python tools/check_exact_float.py [PATH ...]`` (files or directories; default: every package's
``tests/`` and ``tests/``). Prints ``path:line: message`` per site and exits 1 if there is any.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "exact:"
EQUAL_FUNCS = {"equal", "array_equal", "array_equiv", "assert_array_equal", "assert_equal"}
CLOSE_FUNCS = {"assert_close", "assert_allclose", "allclose", "isclose"}
TOLERANCES = {"atol", "rtol", "abs_tol", "rel_tol"}
FLOAT_METHODS = {"item", "tolist", "numpy"}
REDUCTIONS = {"sum", "mean", "norm", "prod", "std", "var", "dot", "max", "min", "amax", "amin"}
MASKS = {"any", "all", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf", "isfinite", "bool", "long"}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return None


def _is_zero(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 0


def _has_float_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, float)
    if isinstance(node, ast.UnaryOp):
        return _has_float_literal(node.operand)
    if isinstance(node, ast.BinOp):
        return _has_float_literal(node.left) or _has_float_literal(node.right)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return any(_has_float_literal(e) for e in node.elts)
    return False


def _is_floaty(node: ast.expr) -> bool:
    """An operand that is obviously a float (or a list of floats read out of a tensor)."""
    if _has_float_literal(node):
        return True
    if isinstance(node, ast.Call):
        name = _name(node.func)
        if isinstance(node.func, ast.Name) and name == "float":
            return True
        if isinstance(node.func, ast.Attribute) and name in FLOAT_METHODS:
            return True
        if isinstance(node.func, ast.Attribute) and name in REDUCTIONS:
            return not _is_mask(node.func.value)  # x.sum() of a float tensor; (x != 0).sum() counts
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math":
        return True  # math.inf, math.pi
    if isinstance(node, ast.Subscript):
        return _is_floaty(node.value)  # x.tolist()[0]
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        parts = [node.operand] if isinstance(node, ast.UnaryOp) else [node.left, node.right]
        return any(_is_floaty(p) for p in parts)
    return False


def _is_mask(node: ast.expr) -> bool:
    """Whether an expression is built on a comparison or a mask (its reductions are counts)."""
    while True:
        if isinstance(node, ast.Compare):
            return True
        if isinstance(node, ast.Call):
            if _name(node.func) in MASKS:
                return True
            node = node.func
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        else:
            return False


def _is_exempt(node: ast.expr) -> bool:
    """``pytest.approx(...)`` (a tolerance comparison), a string, ``None`` or a bool."""
    if isinstance(node, ast.Call) and _name(node.func) == "approx":
        return True
    return isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, (str, bytes, bool))
    )


def _reduced(node: ast.Call) -> ast.expr | None:
    """``x`` in ``x.all()``, ``x.any()``, ``torch.all(x)``, ``torch.any(x)``."""
    if not isinstance(node.func, ast.Attribute) or node.func.attr not in ("all", "any"):
        return None
    if isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "np", "numpy"):
        return node.args[0] if node.args else None
    return node.func.value


def _elementwise_equal(node: ast.expr) -> bool:
    """``a == b`` or ``a.eq(b)`` on tensors, unless one side is an integer literal (a count or a mask)."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], (ast.Eq, ast.NotEq)):
        sides = [node.left, node.comparators[0]]
    elif isinstance(node, ast.Call) and _name(node.func) in ("eq", "ne") and len(node.args) == 1:
        assert isinstance(node.func, ast.Attribute)
        sides = [node.func.value, node.args[0]]
    else:
        return False
    return not any(_is_int_literal(side) for side in sides)


def _is_int_literal(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp):
        return _is_int_literal(node.operand)
    return isinstance(node, ast.Constant) and type(node.value) in (int, bool)


def _sites(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            if name in EQUAL_FUNCS and isinstance(node.func, ast.Attribute):
                yield node, f"{name}() compares floats bit for bit"
            elif name in CLOSE_FUNCS:
                tols = [k.value for k in node.keywords if k.arg in TOLERANCES]
                if tols and all(_is_zero(t) for t in tols):
                    yield node, f"{name}() with zero tolerance"
            target = _reduced(node)
            if target is not None and _elementwise_equal(target):
                yield node, "elementwise == reduced by all()/any()"
        elif isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for op, left, right in zip(node.ops, operands, operands[1:]):
                if not isinstance(op, (ast.Eq, ast.NotEq)):
                    continue
                if _is_exempt(left) or _is_exempt(right):
                    continue
                if _is_floaty(left) or _is_floaty(right):
                    yield node, "== / != on a float operand"
                    break


def _comments(source: str) -> tuple[set[int], set[int]]:
    """Lines whose comment holds the mark, and lines that hold nothing but a comment."""
    marked, alone = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if MARK in tok.string:
                marked.add(tok.start[0])
            if tok.line.strip().startswith("#"):
                alone.add(tok.start[0])
    return marked, alone


def check_source(source: str, path: str = "<string>") -> list[str]:
    """Every unexplained exact float comparison in ``source``, as ``path:line: message``.

    The mark may be on any line of the comparison or in the block of comment lines right above it.
    """
    tree = ast.parse(source, filename=path)
    marked, alone = _comments(source)
    problems: dict[int, str] = {}
    for node, message in _sites(tree):
        first, last = node.lineno, node.end_lineno or node.lineno
        above = first - 1
        while above in alone and above - 1 in alone:  # a comment block: the mark may be on its first line
            above -= 1
        if not any(line in marked for line in range(above, last + 1)):
            problems.setdefault(first, f"{path}:{first}: {message} without an '{MARK}' comment")
    return [problems[line] for line in sorted(problems)]


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if ".nox" not in p.relative_to(path).parts)
        else:
            yield path


def default_paths() -> list[Path]:
    """Every package's tests and the integration tests."""
    return [*sorted(ROOT.glob("packages/*/tests")), ROOT / "tests"]


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or default_paths()
    problems = []
    for path in _files(paths):
        try:
            shown = str(path.resolve().relative_to(ROOT))
        except ValueError:
            shown = str(path)
        problems += check_source(path.read_text(encoding="utf-8"), shown)
    for line in problems:
        print(line)
    if problems:
        print(
            f"{len(problems)} exact float comparison(s) without an '{MARK}' comment: compare different routes "
            "with a tolerance from an error bound, or say why both sides take the same route",
            file=sys.stderr,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
