"""Run the Python code blocks of the README files and docs/ as tests (docs/development.md, "Code in the docs").

Which files: ``README.md``, ``packages/*/README.md`` and ``docs/**/*.md``. Each block belongs to one package:
``packages/<pkg>/README.md`` and ``docs/<pkg>/**`` to ``<pkg>``, everything else to none (``owner()``). Each
package's ``tests/test_doc_blocks.py`` runs its own blocks in the package's isolated test venv, so a block cannot lean
on a sibling that the package does not depend on; the integration tests run the blocks that belong to no package
(all packages installed) and check that every block has exactly one runner.

Conventions in the markdown:

* A block that cannot run in a test (a CUDA GPU, ``torchrun``, a multi-GB download) is preceded by
  ``<!-- not-run: <why> -->`` on the line just before its fence (blank lines allowed); the reason is required.
  Every other ``python`` block must run without error.
* ``# -> <text>`` shows what a ``print`` prints: at the end of the line of that ``print(...)`` call, or on the
  comment-only line(s) right below it (several lines join with newlines). The output is checked: the text between
  numbers must match exactly; a number written with ``d`` decimals may differ by 1.5 units in its last place
  (printing rounds, and a different kernel route may move the value by a few ulps across a rounding boundary);
  an integer must match exactly.

Blocks run one by one, in a fresh namespace each, with ``__name__ == "__main__"``, in the current directory.
Needs only the standard library.
"""

from __future__ import annotations

import builtins
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:((?:(?!-->).)*)-->\s*\Z", re.S)  # one comment, ending right here
ARROW = "# -> "
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


class DocBlockError(AssertionError):
    """A block failed, printed something else than its ``# ->`` comment, or is marked wrongly."""


@dataclass(frozen=True)
class Block:
    """One fenced ``python`` block: where it is, its code, and why it does not run (``None``: it runs)."""

    path: str  # relative to the repository root, e.g. "docs/dni/index.md"
    line: int  # line of the opening fence
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        """``path:line``, the block's name in test ids and tracebacks."""
        return f"{self.path}:{self.line}"


def markdown_files(root: Path = ROOT) -> list[Path]:
    """The files whose blocks are tests: the root README, every package README and every page under docs/."""
    files = [
        root / "README.md",
        *sorted(root.glob("packages/*/README.md")),
        *sorted(root.glob("docs/**/*.md")),
    ]
    return [f for f in files if f.is_file()]


def owner(path: str, root: Path = ROOT) -> str | None:
    """The package a markdown file (path relative to ``root``) belongs to, or ``None``."""
    parts = Path(path).parts
    if len(parts) >= 2 and parts[0] in ("packages", "docs") and (root / "packages" / parts[1]).is_dir():
        return parts[1]
    return None


def extract(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced ``python`` block of ``path``, with its ``not-run`` reason if it has one."""
    text = path.read_text()
    rel = path.relative_to(root).as_posix()
    blocks = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        marker = NOT_RUN.search(text[: m.start()].rstrip())
        reason = None
        if marker is not None:
            reason = " ".join(marker.group(1).split())
            if not reason:
                raise DocBlockError(
                    f"{rel}:{line}: `<!-- not-run: -->` must say why the block cannot run here"
                )
        blocks.append(Block(rel, line, m.group(1), reason))
    return blocks


def collect(package: str | None, root: Path = ROOT) -> list[Block]:
    """Every block that belongs to ``package`` (``None``: to no package)."""
    return [
        b
        for f in markdown_files(root)
        if owner(f.relative_to(root).as_posix(), root) == package
        for b in extract(f, root)
    ]


def expected_outputs(code: str) -> dict[int, str]:
    """``{line of a print call: the text its "# ->" comment shows}`` (lines count from 1 within the block)."""
    expected: dict[int, list[str]] = {}
    last_code = 0
    for number, raw in enumerate(code.splitlines(), 1):
        stripped = raw.strip()
        at = raw.find(ARROW)
        if stripped.startswith(ARROW.strip()):  # a comment-only line: output of the code line above
            if not last_code:
                raise DocBlockError(f"line {number}: '# ->' before any code")
            expected.setdefault(last_code, []).append(stripped[len(ARROW) :] if stripped != "# ->" else "")
            continue
        if stripped and not stripped.startswith("#"):
            last_code = number
        if at >= 0:
            expected.setdefault(number, []).append(raw[at + len(ARROW) :].rstrip())
    return {line: "\n".join(lines) for line, lines in expected.items()}


def _same(expected: str, actual: str) -> bool:
    """``actual`` matches ``expected`` up to the rounding of the numbers ``expected`` shows (module docstring)."""
    exp_nums, act_nums = NUMBER.findall(expected), NUMBER.findall(actual)
    if len(exp_nums) != len(act_nums):
        return False
    if " ".join(NUMBER.sub("#", expected).split()) != " ".join(NUMBER.sub("#", actual).split()):
        return False
    for e, a in zip(exp_nums, act_nums):
        if re.fullmatch(r"[-+]?\d+", e):
            if not re.fullmatch(r"[-+]?\d+", a) or int(e) != int(a):
                return False
            continue
        mantissa = e.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(e.lower().split("e")[1]) if "e" in e.lower() else 0
        # print rounds to `decimals` places: 0.5 unit; a few ulps of a different kernel route may cross a
        # rounding boundary: 1 more unit
        if abs(float(e) - float(a)) > 1.5 * 10.0 ** (exponent - decimals):
            return False
    return True


def run(block: Block) -> None:
    """Execute ``block`` and check each ``# ->`` output; raise :class:`DocBlockError` on any difference."""
    if block.not_run is not None:
        raise DocBlockError(f"{block.id} is marked not-run ({block.not_run})")
    expected = expected_outputs(block.code)
    printed: dict[int, list[str]] = {}
    filename = f"<{block.id}>"

    def recording_print(*args, **kwargs) -> None:
        if kwargs.get("file") is None:
            buf = io.StringIO()
            builtins.print(*args, **{**kwargs, "file": buf})
            frame = sys._getframe(1)
            if frame.f_code.co_filename == filename:
                printed.setdefault(frame.f_lineno, []).append(buf.getvalue())
        builtins.print(*args, **kwargs)

    code = compile(block.code, filename, "exec")
    namespace = {"__name__": "__main__", "print": recording_print}
    exec(code, namespace)  # running the documentation is the point
    for line, text in sorted(expected.items()):
        calls = printed.get(line)
        if not calls:
            raise DocBlockError(
                f"{block.id}, block line {line}: '# ->' shows output, but nothing printed there"
            )
        actual = calls[-1].rstrip("\n")
        if not _same(text, actual):
            raise DocBlockError(
                f"{block.id}, block line {line}: printed\n{actual}\nbut the docs show\n{text}\n"
                "(numbers may differ by 1.5 units in their last shown place)"
            )


def by_owner(root: Path = ROOT) -> dict[str | None, list[Block]]:
    """Every block of every markdown file, grouped by the package that owns it (``None``: no package)."""
    groups: dict[str | None, list[Block]] = {}
    for f in markdown_files(root):
        groups.setdefault(owner(f.relative_to(root).as_posix(), root), []).extend(extract(f, root))
    return groups
