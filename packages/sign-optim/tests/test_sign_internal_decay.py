"""The internal decays against TensorFlow's sign_decay.py (reference/sign-optim.md §2.4, §3.3)."""

import math
import pickle

import pytest
import torch

import altgrad.sign_optim.sign_internal_decay as sid
from altgrad.sign_optim import (
    CosineInternalDecay,
    LinearInternalDecay,
    RestartCosineInternalDecay,
    SignInternalDecay,
    decay_from_dict,
)

STEPS = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999, 1000, 1500]
TABLE = {
    "linear": (LinearInternalDecay(1000), [1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.001, 0, 0]),
    "cosine": (
        CosineInternalDecay(1000),
        [
            1,
            0.9755282581,
            0.9045084972,
            0.7938926261,
            0.6545084972,
            0.5,
            0.3454915028,
            0.2061073739,
            0.09549150281,
            0.02447174185,
            2.467399071e-06,
            0,
            0,
        ],
    ),
    "cosine-5-zero_after-2": (CosineInternalDecay(1000, num_periods=5, zero_after=2), [1, 0, 1] + [0] * 10),
    "cosine-2": (
        CosineInternalDecay(1000, num_periods=2),
        [
            1,
            0.6545084972,
            0.09549150281,
            0.09549150281,
            0.6545084972,
            1,
            0.6545084972,
            0.09549150281,
            0.09549150281,
            0.6545084972,
            0.9999605221,
            1,
            1,
        ],
    ),
    "restart": (
        RestartCosineInternalDecay(1000),
        [
            1,
            0.9755282581,
            0.9045084972,
            0.7938926261,
            0.6545084972,
            0.5,
            0.3454915028,
            0.2061073739,
            0.09549150281,
            0.02447174185,
            2.467399071e-06,
            1,
            1,
        ],
    ),
    "restart-5-zero_after-2": (
        RestartCosineInternalDecay(1000, num_periods=5, zero_after=2),
        [1, 0.5, 1, 0.5] + [0] * 9,
    ),
}


def _tf_reference(kind, T, num_periods, zero_after, step):
    """TF's Python reference of sign_decay_test.py, written independently of the package."""
    step = min(step, T)
    if kind == "linear":
        return float(T - step) / T
    if kind == "cosine":
        fraction = 2.0 * num_periods * step / float(T)
        value = 0.5 * (1.0 + math.cos(math.pi * fraction))
        if zero_after is not None and fraction >= 2 * zero_after:
            return 0.0
        return value
    fraction = (num_periods * step % T) / float(T)
    value = 0.5 * (1.0 + math.cos(math.pi * fraction))
    if zero_after is not None and num_periods * step / float(T) >= zero_after:
        return 0.0
    return value


@pytest.mark.parametrize("name", sorted(TABLE))
def test_decay_table(name):
    decay, expected = TABLE[name]
    got = [decay(s) for s in STEPS]
    assert all(isinstance(v, float) for v in got)
    assert got == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_tensor_step_matches_python_step(name):
    decay, _ = TABLE[name]
    for s in [*STEPS, 1, 7, 333, 2001]:
        value = decay(torch.tensor(float(s)))
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64
        assert value.item() == pytest.approx(decay(s), abs=1e-15)


def test_against_tensorflow_python_reference_on_every_step():
    configs = [
        ("linear", LinearInternalDecay(37), 0, None),
        ("cosine", CosineInternalDecay(37), 0.5, None),
        ("cosine", CosineInternalDecay(37, 3, zero_after=1.5), 3, 1.5),
        ("restart", RestartCosineInternalDecay(37), 1, None),
        ("restart", RestartCosineInternalDecay(37, 4, zero_after=3), 4, 3),
        ("restart", RestartCosineInternalDecay(37, 2.5), 2.5, None),
    ]
    for kind, decay, num_periods, zero_after in configs:
        for step in range(80):
            assert decay(step) == pytest.approx(
                _tf_reference(kind, 37, num_periods, zero_after, step), abs=1e-15
            )


def test_restart_returns_one_after_T_max_and_zero_after_counts_restarts():
    # cydonia999 tests frac >= 2 * zero_after with frac in [0, 1) and never reaches 0 here; TF does.
    decay = RestartCosineInternalDecay(1000, num_periods=5, zero_after=2)
    assert decay(399) > 0
    assert decay(400) == 0.0  # exact: zero_after returns 0.0 itself
    assert all(decay(s) == 0.0 for s in range(400, 1200, 50))  # exact: zero_after returns 0.0 itself
    # exact: t mod T_max is exactly 0, so 0.5·(1 + cos 0) = 1 exactly
    assert RestartCosineInternalDecay(1000, num_periods=3)(1000) == 1.0
    # exact: t mod T_max is exactly 0, so 0.5·(1 + cos 0) = 1 exactly
    assert RestartCosineInternalDecay(10)(10**6) == 1.0


def test_to_dict_round_trip_and_equality():
    for decay, _ in TABLE.values():
        spec = decay.to_dict()
        assert all(isinstance(v, (str, int, float, type(None))) for v in spec.values())
        rebuilt = decay_from_dict(spec)
        assert type(rebuilt) is type(decay)
        assert rebuilt == decay
        assert hash(rebuilt) == hash(decay)
        assert repr(rebuilt) == repr(decay)
        assert pickle.loads(pickle.dumps(decay)) == decay
    assert LinearInternalDecay(5) != LinearInternalDecay(6)
    assert repr(CosineInternalDecay(5)) == "CosineInternalDecay(T_max=5, num_periods=0.5, zero_after=None)"


def test_importable_from_both_modules():
    assert sid.LinearInternalDecay is LinearInternalDecay
    assert sid.CosineInternalDecay is CosineInternalDecay
    assert sid.RestartCosineInternalDecay is RestartCosineInternalDecay
    assert issubclass(LinearInternalDecay, SignInternalDecay)


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: LinearInternalDecay(0), ValueError, "T_max"),
        (lambda: LinearInternalDecay(-3), ValueError, "T_max"),
        (lambda: LinearInternalDecay(10.5), TypeError, "T_max"),
        (lambda: LinearInternalDecay(True), TypeError, "T_max"),
        (lambda: CosineInternalDecay(0), ValueError, "T_max"),
        (lambda: CosineInternalDecay(10, num_periods=0), ValueError, "num_periods"),
        (lambda: CosineInternalDecay(10, num_periods=-1), ValueError, "num_periods"),
        (lambda: CosineInternalDecay(10, zero_after=-1), ValueError, "zero_after"),
        (lambda: CosineInternalDecay(10, zero_after="1"), TypeError, "zero_after"),
        (lambda: RestartCosineInternalDecay(0), ValueError, "T_max"),
        (lambda: RestartCosineInternalDecay(10, num_periods=0), ValueError, "num_periods"),
        (lambda: RestartCosineInternalDecay(10, num_periods=math.nan), ValueError, "num_periods"),
        (lambda: RestartCosineInternalDecay(10, zero_after=-0.5), ValueError, "zero_after"),
        (lambda: LinearInternalDecay(10)(-1), ValueError, "step"),
        (lambda: LinearInternalDecay(10)("3"), TypeError, "step"),
        (lambda: decay_from_dict({"kind": "exponential"}), ValueError, "kind"),
        (lambda: decay_from_dict({"kind": "linear", "T_max": 0}), ValueError, "T_max"),
        (lambda: decay_from_dict(["linear"]), TypeError, "dict"),
    ],
)
def test_bad_arguments(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_user_subclass_is_used_as_a_callable():
    from altgrad.sign_optim import AddSign

    class Half(LinearInternalDecay):
        kind = "half"

        def __call__(self, step):
            return 0.5

        def to_dict(self):
            return {"kind": self.kind, "T_max": self.T_max}

    p = torch.zeros(2, requires_grad=True)
    opt = AddSign([p], lr=0.1, sign_internal_decay=Half(5))
    assert opt.param_groups[0]["sign_internal_decay"] == {"kind": "callable"}
    p.grad = torch.ones(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), -0.1 * 1.5))
