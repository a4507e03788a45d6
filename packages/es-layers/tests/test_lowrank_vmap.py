"""lowrank_linear inside torch.func.vmap (zero-order's population runs it there): batched, no per-member fallback."""

import warnings

import torch
from torch.func import vmap

from altgrad.es_layers import functional as F


def _args(rank, g):
    n, t, k, m = 4, 3, 5, 6
    x = torch.randn(2 * n, t, k, generator=g, dtype=torch.float64)
    w = torch.randn(m, k, generator=g, dtype=torch.float64)
    bias = torch.randn(m, generator=g, dtype=torch.float64)
    a = torch.randn(n, m, rank, generator=g, dtype=torch.float64)
    b = torch.randn(n, k, rank, generator=g, dtype=torch.float64)
    return x, w, bias, a, b


def test_vmapped_lowrank_linear_matches_the_direct_call_without_a_fallback_warning():
    g = torch.Generator().manual_seed(0)
    for rank in (1, 3):
        batches = [_args(rank, g) for _ in range(3)]
        stacked = [torch.stack(ts) for ts in zip(*batches)]
        with warnings.catch_warnings():
            # torch warns "There is a performance drop because we have not yet implemented the batching rule" when an
            # op (addcmul_, baddbmm_) has no vmap rule and runs member by member
            warnings.simplefilter("error")
            got = vmap(
                lambda x, w, bias, a, b: F.lowrank_linear(x, w, bias, a, b, sigma=0.1, antithetic=True)
            )(*stacked)
        for i, args in enumerate(batches):
            want = F.lowrank_linear(*args, sigma=0.1, antithetic=True)
            # float64, one product and one add per element on either route (fused or not): |err| <= 8 eps * |terms|
            torch.testing.assert_close(got[i], want, rtol=1e-13, atol=1e-13)
