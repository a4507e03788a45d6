"""The docs' code blocks are tests (tools/doc_blocks.py): the runner's rules, which test runs which block, and the
blocks of pages that belong to no package (run here, with every package installed)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
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


def test_not_run_marker_is_the_comment_right_before_the_fence(tmp_path):
    """An earlier block's marker does not reach a later block that has another HTML comment before its fence
    (the old pattern spanned from the first marker to the last ``-->``: the later block was skipped silently)."""
    first, second, third = _block(
        tmp_path,
        "<!-- not-run: needs a CUDA GPU -->\n```python\nimport cupy\n```\n\nText.\n\n"
        "<!-- markdownlint-disable -->\n```python\nx = 1\n```\n\n"
        "<!-- not-run: needs one process per rank -->\n```python\nimport torch.distributed\n```\n",
    )
    assert first.not_run == "needs a CUDA GPU"
    assert second.not_run is None  # it runs
    assert (
        third.not_run == "needs one process per rank"
    )  # its own reason, not the text since the first marker


def test_owner_by_path():
    assert doc_blocks.owner("packages/dni/README.md") == "dni"
    assert doc_blocks.owner("docs/es-layers/index.md") == "es-layers"
    assert doc_blocks.owner("docs/examples/index.md") is None
    assert doc_blocks.owner("docs/index.md") is None
    assert doc_blocks.owner("README.md") is None


# ------------------------------------------------------------------ what the READMEs and docs say about set-up


def _outer_site():
    spec = importlib.util.spec_from_file_location("outer_site", ROOT / "tools" / "outer_site.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_torch_install_instruction_everywhere():
    """README, docs home, every package's README and docs page, and nox's no-torch error say the same sentence."""
    sentence = _outer_site().TORCH_INSTALL
    assert "pip install torch==" in sentence
    pages = [ROOT / "README.md", ROOT / "docs" / "index.md"]
    for pkg in sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml")):
        pages += [ROOT / "packages" / pkg / "README.md", ROOT / "docs" / pkg / "index.md"]
    for page in pages:
        text = " ".join(page.read_text().split())  # a sentence may wrap
        assert sentence in text, (
            f"{page.relative_to(ROOT)} lacks the torch install sentence of tools/outer_site.py"
        )
        others = text.replace(sentence, "")
        assert "pip install torch" not in others, (
            f"{page.relative_to(ROOT)} gives a second torch install command"
        )
    assert "{TORCH_INSTALL}" in (ROOT / "tools" / "outer_site.py").read_text()  # the no-torch error


def _sessions() -> list[str]:
    noxfile = str(ROOT / "noxfile.py")
    code = f"import json, runpy, nox.registry; runpy.run_path({noxfile!r}); print(json.dumps(sorted(nox.registry.get())))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_readme_and_nox_list_document_every_session():
    """The README's set-up and sessions table, and the noxfile docstring that ``nox -l`` prints, name every session."""
    pytest.importorskip("nox")
    per_package = re.compile(r"^(tests|bench)-({})$".format("|".join(_packages())))
    names = {per_package.sub(r"\1-<pkg>", n) for n in _sessions()}
    assert {"tests", "gpu", "docs-browser", "tests-<pkg>", "release"} <= names
    readme = (ROOT / "README.md").read_text()
    doc = (ROOT / "noxfile.py").read_text().split('"""')[1]
    for name in names:
        in_readme = f"nox -s {name}" in readme or (
            name.endswith("-<pkg>") and re.search(rf"nox -s {name[:-6]}-({'|'.join(_packages())})\b", readme)
        )
        assert in_readme, f"README.md does not show `nox -s {name}`"
        assert re.search(rf"``{re.escape(name)}( -- [^`]*)?``", doc), (
            f"noxfile.py's docstring does not list {name}"
        )


def test_two_commands_and_the_design_page():
    readme = (ROOT / "README.md").read_text()
    setup = readme[readme.index("## Set-up: two commands") : readme.index("## Other sessions")]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert commands == ["pip install nox && nox -s demo\n", "pip install nox && nox -s tests\n"]
    assert "minutes on 2 cores" in setup
    assert "instruction set" in setup  # the per-ISA passes
    assert (ROOT / "docs" / "design.md").is_file()
    assert "design.md" in (ROOT / "mkdocs.yml").read_text()
    for path in [ROOT / "noxfile.py", *ROOT.glob("docs/**/*.md"), ROOT / "README.md"]:
        assert "DESIGN.md" not in path.read_text(), (
            f"{path.relative_to(ROOT)} refers to DESIGN.md, not in the repo"
        )


def _packages() -> list[str]:
    return sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
