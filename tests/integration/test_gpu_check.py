"""tools/gpu_check.py on a machine without a GPU: a one-line refusal, and its report parsing.

The GPU run itself happens on a GPU machine (``nox -s gpu``); ``nox -s gpu -- --dry-run`` runs its steps on the CPU.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_refuses_without_gpu_in_one_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpu_check: no CUDA GPU")
    assert not out.exists()  # nothing built, nothing written


def test_junit_summary_counts_failures_and_skips(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="t" name="ok"/>
        <testcase classname="t" name="bad"><failure message="assert 1 == 2">trace</failure></testcase>
        <testcase classname="t" name="broken"><error message="fixture failed">trace</error></testcase>
        <testcase classname="t" name="skip1"><skipped message="needs a CUDA GPU"/></testcase>
        <testcase classname="t" name="skip2"><skipped message="needs a CUDA GPU"/></testcase>
        </testsuite></testsuites>"""
    )
    got = _module()._junit_summary(report)
    assert (got["passed"], got["failed"], got["skipped"]) == (1, 2, 2)
    assert [f["test"] for f in got["failures"]] == ["t::bad", "t::broken"]
    assert got["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert "error" in _module()._junit_summary(tmp_path / "missing.xml")
