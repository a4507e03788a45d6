"""Every Python block of this package's README and of docs/es-layers/ runs, in this package's test venv.

The runner and its conventions (`<!-- not-run: why -->`, `# -> output`) are in tools/doc_blocks.py; the
blocks of pages that belong to no package run in tests/integration/test_docs.py.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = "es-layers"
if not (ROOT / "tools" / "doc_blocks.py").is_file():  # an unpacked sdist: no docs to run
    pytest.skip("the docs are in the repository, not in the sdist", allow_module_level=True)
_spec = importlib.util.spec_from_file_location("doc_blocks", ROOT / "tools" / "doc_blocks.py")
assert _spec is not None
assert _spec.loader is not None
doc_blocks = importlib.util.module_from_spec(_spec)
sys.modules["doc_blocks"] = doc_blocks  # its dataclass looks its module up
_spec.loader.exec_module(doc_blocks)

BLOCKS = [b for b in doc_blocks.collect(PACKAGE, ROOT) if b.not_run is None]


def test_the_docs_have_runnable_blocks():
    assert BLOCKS, f"no runnable python block in packages/{PACKAGE}/README.md or docs/{PACKAGE}/"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_doc_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks may write files (a checkpoint)
    doc_blocks.run(block)
