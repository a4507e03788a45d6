"""``compat.torchrl`` against the real TorchRL (``torchrl.objectives.value.functional``, in the test extra).

Differential: the same random inputs (done/terminated mixes with truncations, tensor gamma and lambda, several batch
dims, time on another dim) through both. Inputs are float64, so the loop versions agree to rounding: 1e-10 relative
to max|ref| + 1 (conftest's TOL). TorchRL's ``vec_*`` versions drop the terms where (γλ)^k < 1e-7, an error of at
most 1e-7 * max|δ| / (1 - γλ) per element, below 1e-5 * (max|ref| + 1) for the γλ <= 0.99 used here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from altgrad.discounted_cumsum.compat import torchrl as ours

trl = pytest.importorskip("torchrl.objectives.value.functional")


def _close(a, b, tol=1e-10, name=""):
    assert a.shape == b.shape, (name, a.shape, b.shape)
    scale = b.abs().max().item() + 1.0
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _data(shape, p_done, seed, terminated=True):
    gen = torch.Generator().manual_seed(seed)
    r, v, nv, lp = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    lm = lp + 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    done = torch.rand(shape, generator=gen) < p_done
    term = done & (torch.rand(shape, generator=gen) < 0.5) if terminated else None
    return r, v, nv, lp, lm, done, term


def _rates(kind, shape, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "float":
        # dyadic: TorchRL multiplies a Python-float gamma by an int mask (float32), so 0.97 would be rounded there
        return 0.96875, 0.875
    if kind == "0d":
        return torch.tensor(0.97, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    g = 0.9 + 0.09 * torch.rand(shape, generator=gen, dtype=torch.float64)  # per element
    lam = 0.8 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return g, lam


def _pairs(g, lam, r, v, nv, lp, lm, done, term, td):
    """(name, ours, theirs) for every estimator on one input set."""
    kt = {"time_dim": td}
    return [
        ("gae", ours.generalized_advantage_estimate(g, lam, v, nv, r, done, term, **kt),
         trl.generalized_advantage_estimate(g, lam, v, nv, r, done, term, **kt)),
        ("td0_return", ours.td0_return_estimate(g, nv, r, term if term is not None else done),
         trl.td0_return_estimate(g, nv, r, term if term is not None else done)),
        ("td0_adv", ours.td0_advantage_estimate(g, v, nv, r, done, term),
         trl.td0_advantage_estimate(g, v, nv, r, done, term)),
        ("td1_return", ours.td1_return_estimate(g, nv, r, done, term, **kt),
         trl.td1_return_estimate(g, nv, r, done, term, **kt)),
        ("td1_adv", ours.td1_advantage_estimate(g, v, nv, r, done, term, **kt),
         trl.td1_advantage_estimate(g, v, nv, r, done, term, **kt)),
        ("tdl_return", ours.td_lambda_return_estimate(g, lam, nv, r, done, term, **kt),
         trl.td_lambda_return_estimate(g, lam, nv, r, done, term, **kt)),
        ("tdl_adv", ours.td_lambda_advantage_estimate(g, lam, v, nv, r, done, term, **kt),
         trl.td_lambda_advantage_estimate(g, lam, v, nv, r, done, term, **kt)),
    ]  # fmt: skip


def _flat(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("rates", ["float", "0d", "tensor"])
@pytest.mark.parametrize(
    ("shape", "td"), [((4, 30, 1), -2), ((2, 3, 25, 1), -2), ((3, 20, 2), -2), ((30, 4, 1), 0)]
)
@pytest.mark.parametrize("p_done", [0.0, 0.15, 0.5])
def test_matches_torchrl(rates, shape, td, p_done):
    r, v, nv, lp, lm, done, term = _data(shape, p_done, seed=len(shape) * 100 + int(p_done * 10))
    g, lam = _rates(rates, shape, seed=3)
    for term_arg in (term, None):
        for name, a, b in _pairs(g, lam, r, v, nv, lp, lm, done, term_arg, td):
            for x, y in zip(_flat(a), _flat(b)):
                assert x.dtype == y.dtype, name
                _close(x, y, name=name)


@pytest.mark.parametrize("rates", ["float", "tensor"])
@pytest.mark.parametrize("shape", [(4, 30, 1), (2, 3, 25, 1)])
@pytest.mark.parametrize("p_done", [0.0, 0.2])
@pytest.mark.parametrize(("rho", "c"), [(1.0, 1.0), (0.75, 1.25), (torch.tensor(2.0), 0.5)])
def test_vtrace_matches_torchrl(rates, shape, p_done, rho, c):
    r, v, nv, lp, lm, done, term = _data(shape, p_done, seed=7)
    g, _ = _rates(rates, shape, seed=5)
    for term_arg in (term, None):
        a = ours.vtrace_advantage_estimate(g, lp, lm, v, nv, r, done, term_arg, rho, c)
        b = trl.vtrace_advantage_estimate(g, lp, lm, v, nv, r, done, term_arg, rho, c)
        for x, y in zip(a, b):
            _close(x, y)


@pytest.mark.parametrize("rates", ["float", "tensor"])
def test_vectorised_versions_match_within_their_truncation(rates):
    shape = (3, 40, 1)
    r, v, nv, _, _, done, term = _data(shape, 0.1, seed=11)
    g, lam = _rates(rates, shape, seed=2)
    pairs = [
        (ours.vec_generalized_advantage_estimate(g, lam, v, nv, r, done, term),
         trl.vec_generalized_advantage_estimate(g, lam, v, nv, r, done, term)),
    ]  # fmt: skip
    if rates == "float":  # TorchRL's vectorised TD versions fail on a per-element gamma (an expand error)
        pairs += [
        (ours.vec_td_lambda_return_estimate(g, lam, nv, r, done, term),
         trl.vec_td_lambda_return_estimate(g, lam, nv, r, done, term)),
        (ours.vec_td_lambda_advantage_estimate(g, lam, v, nv, r, done, term),
         trl.vec_td_lambda_advantage_estimate(g, lam, v, nv, r, done, term)),
        (ours.vec_td1_return_estimate(g, nv, r, done, term),
         trl.vec_td1_return_estimate(g, nv, r, done, term)),
        (ours.vec_td1_advantage_estimate(g, v, nv, r, done, term),
         trl.vec_td1_advantage_estimate(g, v, nv, r, done, term)),
    ]  # fmt: skip
    for a, b in pairs:
        for x, y in zip(_flat(a), _flat(b)):
            _close(x, y, tol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    t=st.integers(1, 12),
    f=st.integers(1, 2),
    p_done=st.sampled_from([0.0, 0.3, 1.0]),
    per_elem=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_torchrl(batch, t, f, p_done, per_elem, seed):
    shape = (*batch, t, f)
    r, v, nv, lp, lm, done, term = _data(shape, p_done, seed)
    g, lam = _rates("tensor" if per_elem else "float", shape, seed)
    for name, a, b in _pairs(g, lam, r, v, nv, lp, lm, done, term, -2):
        for x, y in zip(_flat(a), _flat(b)):
            _close(x, y, name=name)
    a = ours.vtrace_advantage_estimate(g, lp, lm, v, nv, r, done, term, 0.875, 1.125)
    b = trl.vtrace_advantage_estimate(g, lp, lm, v, nv, r, done, term, 0.875, 1.125)
    for x, y in zip(a, b):
        _close(x, y)


def test_float32_agrees_with_torchrl():
    """float32 inputs: both round to float32; ours carries in float64. Bound: 2e-5 * (max|ref| + 1) (conftest)."""
    r, v, nv, _, _, done, term = (
        t.float() if t.is_floating_point() else t for t in _data((8, 200, 1), 0.02, 1)
    )
    a = ours.generalized_advantage_estimate(0.99, 0.95, v, nv, r, done, term)
    b = trl.generalized_advantage_estimate(0.99, 0.95, v, nv, r, done, term)
    for x, y in zip(a, b):
        assert x.dtype == torch.float32
        _close(x.double(), y.double(), tol=2e-5)


def test_unsupported_arguments_are_refused():
    r = torch.zeros(2, 5, 1)
    d = torch.zeros(2, 5, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="`rolling_gamma`"):
        ours.td_lambda_return_estimate(torch.full((2, 5, 1), 0.9), 0.9, r, r, d, rolling_gamma=False)
    with pytest.raises(ValueError, match="`rolling_gamma`"):
        ours.td1_advantage_estimate(0.9, r, r, r, d, rolling_gamma=False)
    with pytest.raises(ValueError, match="`rho_thresh`"):
        ours.vtrace_advantage_estimate(0.9, r, r, r, r, r, d, rho_thresh=torch.ones(2, 5, 1))
    with pytest.raises(ValueError, match="`c_thresh`"):
        ours.vtrace_advantage_estimate(0.9, r, r, r, r, r, d, c_thresh="1")
    with pytest.raises(ValueError, match="`next_state_value`"):
        ours.generalized_advantage_estimate(0.9, 0.9, r, torch.zeros(2, 4, 1), r, d)
    with pytest.raises(ValueError, match="`done`"):
        ours.generalized_advantage_estimate(0.9, 0.9, r, r, r, torch.zeros(3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="`terminated`"):
        ours.td0_return_estimate(0.9, r, r)
