"""Where the CPU kernels run a call's parts: torch's own OpenMP workers when torch loaded GNU OpenMP, else threads
of the module's own (``ALTGRAD_CPU_THREADS=std`` forces them). After a parallel op torch's OpenMP workers spin-wait
on their cores, so threads of our own shared those cores with them (GAE at (4096, 128) on 2 threads: 0.70 ms alone,
1.14-1.44 ms right after a matmul; on torch's workers 0.52 and 0.56-0.61 ms). Both pools split a call into the same
parts and each part runs the same arithmetic on either, so the results must agree bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from altgrad.discounted_cumsum import _native

pytestmark = pytest.mark.skipif(not _native.cpu_available(), reason="needs the compiled CPU module")

# Scans (rows, columns, long chunked rows) and fused estimators (rows, columns) at 2 threads, with the per-thread
# threshold lowered so that every one of these small problems is split.
_CASES = textwrap.dedent(
    """
    import sys, torch
    from altgrad.discounted_cumsum import _native, discounted_cumsum
    from altgrad.discounted_cumsum.compat import torchrl as trl
    torch.set_num_threads(2)
    _native._set_chunk_tuning(4096, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=g)
    v, nv = torch.randn(64, 300, generator=g), torch.randn(64, 300, generator=g)
    lp, lm = torch.randn(64, 300, generator=g), torch.randn(64, 300, generator=g)
    done = torch.rand(64, 300, generator=g) < 0.05
    term = done & (torch.rand(64, 300, generator=g) < 0.5)
    long = torch.randn(2, 20000, generator=g)
    out = {
        "scan rows": discounted_cumsum(x, 0.97, dones=done, reverse=True),
        "scan columns": discounted_cumsum(x.t().contiguous(), 0.97, dim=0),
        "scan long rows": discounted_cumsum(long, 0.999),
        "gae rows": trl.generalized_advantage_estimate(0.99, 0.95, v, nv, x, done, term, time_dim=-1),
        "gae columns": trl.generalized_advantage_estimate(
            0.99, 0.95, v.t(), nv.t(), x.t(), done.t(), term.t(), time_dim=0
        ),
        "vtrace rows": trl.vtrace_advantage_estimate(0.99, lp, lm, v, nv, x, done, term, time_dim=-1),
    }
    torch.save({"pool": _native._thread_pool(), "out": out}, sys.argv[1])
    """
)


def _subprocess(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run(tmp_path, name: str, **env: str) -> dict:
    path = tmp_path / f"{name}.pt"
    proc = _subprocess(_CASES, str(path), **env)
    assert proc.returncode == 0, proc.stderr
    return torch.load(path)


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _torch_uses_gnu_openmp() -> bool:
    """torch's parallel backend is OpenMP and the process has GNU OpenMP (libgomp.so.1) loaded."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return False
    with open("/proc/self/maps") as f:
        return "libgomp.so.1" in f.read()


def test_own_threads_and_torchs_openmp_workers_give_the_same_bits(tmp_path):
    mine = _run(tmp_path, "std", ALTGRAD_CPU_THREADS="std")
    default = _run(tmp_path, "default")
    assert mine["pool"] == "std"
    assert default["pool"] == ("openmp" if _torch_uses_gnu_openmp() else "std")
    for key, want in mine["out"].items():
        got = default["out"][key]
        for a, b in zip(_as_tuple(got), _as_tuple(want), strict=True):
            # exact: both pools run the same parts, and a part's arithmetic does not depend on its thread
            assert torch.equal(a, b), key


@pytest.mark.skipif(not _torch_uses_gnu_openmp(), reason="torch does not run on GNU OpenMP here")
def test_parts_run_on_torchs_openmp_workers():
    from altgrad.discounted_cumsum import discounted_cumsum

    discounted_cumsum(torch.randn(4, 8), 0.9)  # any call; the pool is looked up at the first parallel one
    assert _native._thread_pool() == "openmp"


_FIRST_PARALLEL_CALL = textwrap.dedent(
    """
    import torch
    from altgrad.discounted_cumsum import _native, discounted_cumsum
    torch.set_num_threads(2)
    _native._set_chunk_tuning(4096, 64)
    discounted_cumsum(torch.randn(64, 300), 0.9)
    """
)


@pytest.mark.parametrize("value", ["own", "STD", "std "])
def test_an_unknown_thread_pool_is_an_error_naming_the_choices(value):
    out = _subprocess(_FIRST_PARALLEL_CALL, ALTGRAD_CPU_THREADS=value)
    assert out.returncode != 0
    assert f"ALTGRAD_CPU_THREADS={value} is not one of std, openmp" in out.stderr, out.stderr


def test_forcing_openmp_where_torch_has_it_uses_it_else_is_an_error():
    out = _subprocess(_FIRST_PARALLEL_CALL + "print(_native._thread_pool())\n", ALTGRAD_CPU_THREADS="openmp")
    if _torch_uses_gnu_openmp():
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "openmp"
    else:
        assert "ALTGRAD_CPU_THREADS=openmp: torch's GNU OpenMP runtime" in out.stderr, out.stderr
