"""Differential property test: the DNI wrapper against a hand-written float64 DNI step.

Model: a wrapped ``Linear(d_in, d_h)`` (weights ``A, a``) whose output feeds an unwrapped head
``Linear(d_h, k)`` (``W, w``) with an MSE loss; a linear synthesizer ``ŝ = h Mᵀ + m``; plain SGD everywhere.
One training step, written out by hand (paper, update unlocking):

1. ``h = x Aᵀ + a``;  ``ŝ = h Mᵀ + m``.
2. The wrapped layer is stepped at once from ``ŝ``: ``A -= lr·ŝᵀx``, ``a -= lr·Σ_b ŝ_b``.
3. ``out = h Wᵀ + w`` (``h`` from the old ``A``); ``g_out = 2(out − y)/(B·k)``;
   head: ``W -= lr_h·g_outᵀh``, ``w -= lr_h·Σ g_out``; target at ``h``: ``g = g_out W``.
4. Synthesizer (applied before its next prediction): ``d = 2(ŝ − g)/B``; ``M -= lr_s·dᵀh``, ``m -= lr_s·Σ d``.

Non-finite inputs: we *propagate* them. A NaN or ±inf anywhere in ``x`` makes the synthetic gradient and the
wrapped layer's step non-finite, so the weights become non-finite too; it never turns into a finite step.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad.dni import DNI

LR, LR_H, LR_S = 0.3, 0.2, 0.4
STEPS = 2


def reference(x, y, A, a, W, w, M, m):
    """STEPS steps of the update above in float64 (inputs are cloned)."""
    A, a, W, w, M, m = (t.double().clone() for t in (A, a, W, w, M, m))
    for xs, ys in zip(x, y):
        xs, ys = xs.double(), ys.double()
        B, k = ys.shape
        h = xs @ A.T + a
        s = h @ M.T + m
        A, a = A - LR * s.T @ xs, a - LR * s.sum(0)
        out = h @ W.T + w
        g_out = 2 * (out - ys) / (B * k)
        g = g_out @ W
        W, w = W - LR_H * g_out.T @ h, w - LR_H * g_out.sum(0)
        d = 2 * (s - g) / B
        M, m = M - LR_S * d.T @ h, m - LR_S * d.sum(0)
    return A, a, W, w, M, m


def wrapper(x, y, A, a, W, w, M, m):
    dtype = x[0].dtype
    layer = torch.nn.Linear(A.shape[1], A.shape[0], dtype=dtype)
    head = torch.nn.Linear(W.shape[1], W.shape[0], dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(A), layer.bias.copy_(a), head.weight.copy_(W), head.bias.copy_(w)
    dni = DNI(
        layer,
        hidden_size=1,
        dni_params={"num_layers": 0},
        grad_optim="sgd",
        grad_lr=LR_S,
        lr=LR,
        recursive=False,
    )
    synth = dni.interface("").synthesizer.final
    with torch.no_grad():
        synth.weight.copy_(M), synth.bias.copy_(m)
    for xs, ys in zip(x, y):
        head.zero_grad()
        F.mse_loss(head(dni(xs)), ys).backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= LR_H * p.grad
        dni.step_synthesizers()
    return layer.weight, layer.bias, head.weight, head.bias, synth.weight, synth.bias


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B, d_in, d_h, k = (draw(st.integers(1, n)) for n in (8, 6, 6, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def u(*shape, bound=1.0):  # uniform in [-bound, bound]
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(dtype)

    x = [u(B, d_in) for _ in range(STEPS)]
    y = [u(B, k) for _ in range(STEPS)]
    # PyTorch's default init scale 1/sqrt(fan_in) keeps every intermediate O(1).
    weights = (
        u(d_h, d_in, bound=d_in**-0.5),
        u(d_h, bound=d_in**-0.5),
        u(k, d_h, bound=d_h**-0.5),
        u(k, bound=d_h**-0.5),
        u(d_h, d_h, bound=d_h**-0.5),
        u(d_h, bound=d_h**-0.5),
    )
    bad = draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")]))
    if bad is not None:
        step = draw(st.integers(0, STEPS - 1))
        x[step][draw(st.integers(0, B - 1)), draw(st.integers(0, d_in - 1))] = bad
    return x, y, weights, bad


@pytest.mark.parametrize("threads", [1, 2])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(problem=problems())
def test_wrapper_matches_the_hand_written_step(threads, problem):
    x, y, weights, bad = problem
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = wrapper(x, y, *weights)
    finally:
        torch.set_num_threads(old)
    want = reference(x, y, *weights)
    dtype = x[0].dtype
    n = max(x[0].shape[0], x[0].shape[1], weights[0].shape[0], y[0].shape[1])
    # Error bound: each quantity is at most 4 chained dot products per step (h, ŝ, g, update) over 2 steps,
    # each of length <= n with O(1) factors (|x| <= 1, weights <= 1/sqrt(fan_in), lrs < 1), so by
    # |fl(u·v) − u·v| <= γ_n Σ|u_i v_i| <= n·u·n the absolute error is <= 8·n²·eps; doubled for the final
    # rounding to the working dtype: 16·n²·eps, relative to max(1, |value|).
    tol = 16 * n * n * torch.finfo(dtype).eps
    for name, g_, w_ in zip(("A", "a", "W", "w", "M", "m"), got, want):
        g_ = g_.detach().double()
        finite = torch.isfinite(w_)
        # exact: bool masks
        assert torch.equal(torch.isfinite(g_), finite), name  # non-finite exactly where the reference is
        torch.testing.assert_close(g_[finite], w_[finite], rtol=tol, atol=tol, msg=name)
    if bad is not None:
        assert not torch.isfinite(got[0]).all()  # a non-finite input never becomes a finite step
