"""Issue 23 item 10: results and gradients do not depend on the number of threads.

Long rows (>= 2^18 steps) are cut into chunks whose length is fixed by the row alone, and the gradient of a
broadcast gamma or initial value is summed in a fixed order (``_ops._sum_to_size``), so 1, 2 and 3 threads run the
same arithmetic and must agree bit for bit. Before the fix a single row of 2^18 steps or more was split into as
many chunks as threads: float32 results moved by 1.5e-5, float64 by 7.8e-14, bfloat16 by 0.25.
"""

import pytest
import torch

from altgrad.discounted_cumsum import _native, discounted_cumsum

pytestmark = pytest.mark.skipif(not _native.cpu_available(), reason="needs the compiled CPU module")


class threads:
    """torch.set_num_threads(k) (the kernel reads torch's thread count), restored afterwards."""

    def __init__(self, k):
        self.k = k

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.k)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _run(case, dtype, n, k):
    g = torch.Generator().manual_seed(n)
    rows = 2 if case == "per-element" and n < 2**20 else 1  # 2 rows: row-parallel at 2 threads, chunked at 3
    x = (3 * torch.randn(rows, n, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    initial = torch.randn(rows, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if case == "scalar":  # constant-gate kernel; grad of a scalar gamma sums over the whole row
        gamma = torch.tensor(0.9999, dtype=dtype, requires_grad=True)
        dones, reverse = None, True
    else:  # sequential kernel: per-element gates and resets
        gamma = (
            (0.99 + 0.01 * torch.rand(rows, n, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
        )
        dones, reverse = torch.rand(rows, n, generator=g) < 1e-4, False
    with threads(k):
        y = discounted_cumsum(x, gamma, dim=1, reverse=reverse, dones=dones, initial=initial)
        grads = torch.autograd.grad((y * w).sum(), (x, gamma, initial))
    return (y.detach(), *grads)


@pytest.mark.parametrize("case", ["scalar", "per-element"])
@pytest.mark.parametrize("n", [2**18 + 1, 2**20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_long_rows_and_gradients_are_bit_identical_at_1_2_3_threads(case, n, dtype):
    one = _run(case, dtype, n, 1)
    assert all(t.isfinite().all() for t in one)
    for k in (2, 3):
        other = _run(case, dtype, n, k)
        for name, a, b in zip(("y", "grad x", "grad gamma", "grad initial"), one, other, strict=True):
            # exact: the chunking and summation order are fixed by the shapes, so every thread count runs the
            # same arithmetic (threads only decide where each chunk is computed)
            assert torch.equal(a, b), f"{name} differs at {k} threads"


class chunking:
    """Forces short chunks (length min_row / 8) so that rows of a few thousand steps use many of them."""

    def __init__(self, min_row):
        self.min_row = min_row

    def __enter__(self):
        self.old = _native._set_chunk_tuning(self.min_row, 1)

    def __exit__(self, *exc):
        _native._set_chunk_tuning(*self.old)


@pytest.mark.parametrize("reverse", [False, True])
def test_many_uneven_chunks_are_bit_identical_at_1_to_4_threads(reverse):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1001, generator=g)
    gate = 0.9 + 0.1 * torch.rand(3, 1001, generator=g)
    dones = torch.rand(3, 1001, generator=g) < 0.01
    with chunking(64):
        outs = []
        for k in (1, 2, 3, 4):
            with threads(k):
                outs.append(
                    (
                        discounted_cumsum(x, 0.97, dim=1, reverse=reverse, initial=torch.ones(3)),
                        discounted_cumsum(x, gate, dim=1, reverse=reverse, dones=dones),
                    )
                )
    for k, (a, b) in zip((2, 3, 4), outs[1:], strict=True):
        assert torch.equal(a, outs[0][0]), k  # exact: same chunks, same arithmetic (see above)
        assert torch.equal(b, outs[0][1]), k  # exact: same chunks, same arithmetic (see above)
