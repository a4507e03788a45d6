"""foreach == for-loop, bit for bit, over every dtype x weight-decay mode x maximize x decay.

The docs promise bit-identical results for the two paths. ``sign()`` turns any rounding difference
in ``m`` near zero into a full-size step, so this is checked with exact bit patterns, never a
tolerance. Run by nox at the default CPU kernels and again with ``ATEN_CPU_CAPABILITY=avx2``.
"""

import itertools

import pytest
import torch

from altgrad.sign_optim import AddSign, CosineInternalDecay, LinearInternalDecay, PowerSign

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]
WEIGHT_DECAY = [
    {},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    # 1 - lr * wd is not representable in fp16/bf16: a foreach multiply by that scalar rounds it first.
    {"weight_decay": 0.37, "decoupled_weight_decay": True},
]
DECAYS = [None, LinearInternalDecay(7), CosineInternalDecay(5, num_periods=1.5), lambda s: 0.3 + s / 7.0]


def _bits(t):
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def _params(dtype, gen, device):
    shapes = [(37, 5), (3,), ()]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]
    # A non-contiguous parameter (transposed storage).
    params.append(torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device, dtype).t())
    return [torch.nn.Parameter(p) for p in params]


def _run(cls, dtype, config, foreach, device):
    gen = torch.Generator().manual_seed(1234)
    params = _params(dtype, gen, device)
    opt = cls(params, foreach=foreach, **config)
    for t in range(5):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if t == 3:
                # Steer m to within rounding of zero: m_new = 0.9 m - 0.9 m = 0 in exact arithmetic.
                m = opt.state[p]["exp_avg"].detach()
                m = torch.view_as_real(m) if m.is_complex() else m
                g = (-9.0 * m.double().cpu()).reshape(g.shape) if not p.is_complex() else g
            p.grad = g.to(device, dtype) if not (i == 2 and t == 1) else None
        opt.step()
    return [_bits(p) for p in params] + [_bits(opt.state[p]["exp_avg"]) for p in params]


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_foreach_matches_forloop_bitwise_all_dtypes(cls, dtype, device):
    alpha = 0.7 if cls is AddSign else 2.5
    failures = []
    for wd, maximize, decay in itertools.product(WEIGHT_DECAY, (False, True), DECAYS):
        config = {"lr": 0.013, "alpha": alpha, "maximize": maximize, "sign_internal_decay": decay, **wd}
        loop = _run(cls, dtype, config, False, device)
        fe = _run(cls, dtype, config, True, device)
        # exact: bit-parity by construction (same op sequence; CPU foreach loops the per-tensor kernels)
        n_diff = sum(int((a != b).sum()) for a, b in zip(loop, fe))
        if n_diff:
            failures.append(f"{wd} maximize={maximize} decay={decay!r}: {n_diff} elements differ")
    assert not failures, "\n".join(failures)
