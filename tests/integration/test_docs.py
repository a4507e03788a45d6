"""The docs' code blocks are tests (tools/doc_blocks.py): the runner's rules, which test runs which block, and the
blocks of pages that belong to no package (run here, with every package installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("doc_blocks", ROOT / "tools" / "doc_blocks.py")
assert _spec is not None
assert _spec.loader is not None
doc_blocks = importlib.util.module_from_spec(_spec)
sys.modules["doc_blocks"] = doc_blocks  # its dataclass looks its module up
_spec.loader.exec_module(doc_blocks)

UNOWNED = [b for b in doc_blocks.collect(None, ROOT) if b.not_run is None]


@pytest.mark.parametrize("block", UNOWNED, ids=lambda b: b.id)
def test_doc_block_of_no_package_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc_blocks.run(block)


def test_every_block_has_a_runner_or_a_reason():
    """Each package with blocks has tests/test_doc_blocks.py; the docs hold python blocks; every not-run says why."""
    groups = doc_blocks.by_owner(ROOT)
    assert sum(len(v) for v in groups.values()) >= 15  # the docs' examples did not silently vanish
    for package, blocks in groups.items():
        if package is not None and blocks:
            test = ROOT / "packages" / package / "tests" / "test_doc_blocks.py"
            assert test.is_file(), f"{package} has doc blocks but no tests/test_doc_blocks.py to run them"
            assert f'PACKAGE = "{package}"' in test.read_text()
        for block in blocks:
            if block.not_run is not None:
                assert len(block.not_run.split()) >= 3, (
                    f"{block.id}: say why it cannot run ({block.not_run!r})"
                )
    shown = [
        b for bs in groups.values() for b in bs if b.not_run is None and doc_blocks.expected_outputs(b.code)
    ]
    assert len(shown) >= 2  # blocks whose printed output is checked


def _block(tmp_path: Path, markdown: str) -> list:
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(markdown)
    return doc_blocks.extract(page, tmp_path)


def test_output_comments_are_checked_to_the_shown_rounding(tmp_path):
    (block,) = _block(
        tmp_path,
        "Text.\n\n```python\nimport math\nprint(f'pi {math.pi:.4f}', [1, 2])  # -> pi 3.1416 [1, 2]\n"
        "print(round(math.e, 6))\n# -> 2.718282\nfor i in range(2):\n    print(i)  # -> 1\n```\n",
    )
    assert block.not_run is None
    assert block.line == 3
    assert doc_blocks.expected_outputs(block.code) == {2: "pi 3.1416 [1, 2]", 3: "2.718282", 6: "1"}
    doc_blocks.run(block)  # the last print of a line is the one shown
    for wrong in [
        "pi 3.1418 [1, 2]",  # 2 units in the last place
        "pi 3.1416 [1, 3]",  # an integer differs
        "pi: 3.1416 [1, 2]",  # the text differs
        "pi 3.1416 [1, 2, 3]",  # a number too many
    ]:
        bad = doc_blocks.Block("x.md", 1, block.code.replace("pi 3.1416 [1, 2]", wrong), None)
        with pytest.raises(doc_blocks.DocBlockError, match="but the docs show"):
            doc_blocks.run(bad)
    near = doc_blocks.Block("x.md", 1, block.code.replace("3.1416", "3.1415"), None)
    doc_blocks.run(near)  # 1 unit: rounding of a nearby value (tolerance 1.5 units)


def test_a_failing_or_silent_block_fails(tmp_path):
    (failing,) = _block(tmp_path, "```python\nx = undefined_name\n```\n")
    with pytest.raises(NameError):
        doc_blocks.run(failing)
    (silent,) = _block(tmp_path, "```python\nx = 1  # -> 1\n```\n")
    with pytest.raises(doc_blocks.DocBlockError, match="nothing printed there"):
        doc_blocks.run(silent)


def test_not_run_marker_needs_a_reason(tmp_path):
    (marked,) = _block(tmp_path, "<!-- not-run: needs a CUDA GPU -->\n\n```python\nimport cupy\n```\n")
    assert marked.not_run == "needs a CUDA GPU"
    with pytest.raises(doc_blocks.DocBlockError, match="marked not-run"):
        doc_blocks.run(marked)
    with pytest.raises(doc_blocks.DocBlockError, match="must say why"):
        _block(tmp_path, "<!-- not-run: -->\n```python\nimport cupy\n```\n")
    (far,) = _block(tmp_path, "<!-- not-run: a comment further up -->\n\nText.\n\n```python\nx = 1\n```\n")
    assert far.not_run is None  # the marker must be right before the fence


def test_owner_by_path():
    assert doc_blocks.owner("packages/dni/README.md") == "dni"
    assert doc_blocks.owner("docs/es-layers/index.md") == "es-layers"
    assert doc_blocks.owner("docs/examples/index.md") is None
    assert doc_blocks.owner("docs/index.md") is None
    assert doc_blocks.owner("README.md") is None
