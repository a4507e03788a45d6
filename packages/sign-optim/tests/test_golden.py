"""Golden values from TensorFlow's own tests (reference/sign-optim.md §3), in float64 and float32.

Setup of every case: var0 = [1, 2] with g0 = [0.1, 0.1], var1 = [3, 4] with g1 = [0.01, 0.01], m = 0;
steps t = 1..7 use +g for t <= 4 and -g afterwards (TF's ``update`` / ``neg_update``).
"""

import math

import pytest
import torch

from altgrad.sign_optim import AddSign, LinearInternalDecay, PowerSign

# (var0[0], var0[1], var1[0], var1[1], m(var0), m(var1)) after each step t = 1..7.
ADDSIGN_A = [
    (0.98, 1.98, 2.998, 3.998, 0.009999999999999998, 0.0009999999999999998),
    (0.96, 1.96, 2.9960000000000004, 3.9960000000000004, 0.018999999999999996, 0.0018999999999999998),
    (0.94, 1.94, 2.9940000000000007, 3.9940000000000007, 0.027099999999999996, 0.0027099999999999997),
    (
        0.9199999999999999,
        1.92,
        2.992000000000001,
        3.992000000000001,
        0.03438999999999999,
        0.0034389999999999993,
    ),
    (0.9199999999999999, 1.92, 2.992000000000001, 3.992000000000001, 0.020950999999999994, 0.0020951),
    (
        0.9199999999999999,
        1.92,
        2.992000000000001,
        3.992000000000001,
        0.008855899999999996,
        0.0008855900000000001,
    ),
    (0.94, 1.94, 2.9940000000000007, 3.9940000000000007, -0.0020296900000000007, -0.00020296899999999968),
]
ADDSIGN_B = [
    (0.9989, 1.9989, 2.99989, 3.99989, 0.019999999999999997, 0.0019999999999999996),
    (
        0.9978,
        1.9977999999999998,
        2.9997800000000003,
        3.9997800000000003,
        0.03599999999999999,
        0.0035999999999999995,
    ),
    (
        0.9967,
        1.9966999999999997,
        2.9996700000000005,
        3.9996700000000005,
        0.04879999999999999,
        0.004879999999999999,
    ),
    (
        0.9956,
        1.9955999999999996,
        2.9995600000000007,
        3.9995600000000007,
        0.05903999999999999,
        0.0059039999999999995,
    ),
    (0.9947, 1.9946999999999997, 2.9994700000000005, 3.9994700000000005, 0.027232, 0.0027232000000000007),
    (
        0.9938,
        1.9937999999999998,
        2.9993800000000004,
        3.9993800000000004,
        0.0017856000000000052,
        0.00017856000000000122,
    ),
    (0.9949, 1.9949, 2.99949, 3.99949, -0.018571519999999994, -0.0018571519999999986),
]
ADDSIGN_C = [
    (0.98, 1.98, 2.998, 3.998, 0.009999999999999998, 0.0009999999999999998),
    (0.961, 1.961, 2.9961, 3.9961, 0.018999999999999996, 0.0018999999999999998),
    (0.943, 1.943, 2.9943000000000004, 3.9943000000000004, 0.027099999999999996, 0.0027099999999999997),
    (
        0.9259999999999999,
        1.9260000000000002,
        2.9926000000000004,
        3.9926000000000004,
        0.03438999999999999,
        0.0034389999999999993,
    ),
    (
        0.9299999999999999,
        1.9300000000000002,
        2.9930000000000003,
        3.9930000000000003,
        0.020950999999999994,
        0.0020951,
    ),
    (
        0.9349999999999999,
        1.935,
        2.9935000000000005,
        3.9935000000000005,
        0.008855899999999996,
        0.0008855900000000001,
    ),
    (0.949, 1.949, 2.9949000000000003, 3.9949000000000003, -0.0020296900000000007, -0.00020296899999999968),
]
POWERSIGN_A = [
    (
        0.9728171817154095,
        1.9728171817154097,
        2.997281718171541,
        3.997281718171541,
        0.009999999999999998,
        0.0009999999999999998,
    ),
    (
        0.9456343634308191,
        1.9456343634308193,
        2.994563436343082,
        3.994563436343082,
        0.018999999999999996,
        0.0018999999999999998,
    ),
    (
        0.9184515451462286,
        1.918451545146229,
        2.991845154514623,
        3.991845154514623,
        0.027099999999999996,
        0.0027099999999999997,
    ),
    (
        0.8912687268616382,
        1.8912687268616386,
        2.989126872686164,
        3.989126872686164,
        0.03438999999999999,
        0.0034389999999999993,
    ),
    (
        0.8949475212733525,
        1.894947521273353,
        2.989494752127335,
        3.989494752127335,
        0.020950999999999994,
        0.0020951,
    ),
    (
        0.8986263156850669,
        1.8986263156850676,
        2.9898626315685064,
        3.9898626315685064,
        0.008855899999999996,
        0.0008855900000000001,
    ),
    (
        0.9258091339696574,
        1.925809133969658,
        2.9925809133969654,
        3.9925809133969654,
        -0.0020296900000000007,
        -0.00020296899999999968,
    ),
]
POWERSIGN_B = [
    (0.9, 1.9, 2.99, 3.99, 0.019999999999999997, 0.0019999999999999996),
    (
        0.8,
        1.7999999999999998,
        2.9800000000000004,
        3.9800000000000004,
        0.03599999999999999,
        0.0035999999999999995,
    ),
    (
        0.7000000000000001,
        1.6999999999999997,
        2.9700000000000006,
        3.9700000000000006,
        0.04879999999999999,
        0.004879999999999999,
    ),
    (
        0.6000000000000001,
        1.5999999999999996,
        2.960000000000001,
        3.960000000000001,
        0.05903999999999999,
        0.0059039999999999995,
    ),
    (
        0.6010000000000001,
        1.6009999999999995,
        2.960100000000001,
        3.960100000000001,
        0.027232,
        0.0027232000000000007,
    ),
    (
        0.6020000000000001,
        1.6019999999999994,
        2.9602000000000013,
        3.9602000000000013,
        0.0017856000000000052,
        0.00017856000000000122,
    ),
    (
        0.7020000000000001,
        1.7019999999999995,
        2.970200000000001,
        3.970200000000001,
        -0.018571519999999994,
        -0.0018571519999999986,
    ),
]
POWERSIGN_C = [
    (
        0.9728171817154095,
        1.9728171817154097,
        2.997281718171541,
        3.997281718171541,
        0.009999999999999998,
        0.0009999999999999998,
    ),
    (
        0.94822115060384,
        1.9482211506038403,
        2.994822115060384,
        3.994822115060384,
        0.018999999999999996,
        0.0018999999999999998,
    ),
    (
        0.9259657413189154,
        1.9259657413189155,
        2.9925965741318916,
        3.9925965741318916,
        0.027099999999999996,
        0.0027099999999999997,
    ),
    (
        0.9058282142442107,
        1.9058282142442107,
        2.9905828214244212,
        3.9905828214244212,
        0.03438999999999999,
        0.0034389999999999993,
    ),
    (
        0.9113163306051509,
        1.911316330605151,
        2.9911316330605153,
        3.9911316330605153,
        0.020950999999999994,
        0.0020951,
    ),
    (
        0.9173816372022773,
        1.9173816372022774,
        2.991738163720228,
        3.991738163720228,
        0.008855899999999996,
        0.0008855900000000001,
    ),
    (
        0.93229988417869,
        1.93229988417869,
        2.9932299884178692,
        3.9932299884178692,
        -0.0020296900000000007,
        -0.00020296899999999968,
    ),
]
POWERSIGN_D = [
    (0.998, 1.998, 2.9998, 3.9998, 0.019999999999999997, 0.0019999999999999996),
    (0.996, 1.996, 2.9996, 3.9996, 0.03599999999999999, 0.0035999999999999995),
    (0.994, 1.994, 2.9994, 3.9994, 0.04879999999999999, 0.004879999999999999),
    (0.992, 1.992, 2.9992, 3.9992, 0.05903999999999999, 0.0059039999999999995),
    (0.9924999999999999, 1.9925, 2.99925, 3.99925, 0.027232, 0.0027232000000000007),
    (0.9929999999999999, 1.9929999999999999, 2.9993, 3.9993, 0.0017856000000000052, 0.00017856000000000122),
    (0.9949999999999999, 1.9949999999999999, 2.9995, 3.9995, -0.018571519999999994, -0.0018571519999999986),
]

CASES = {
    "AddSign-A": (AddSign, {"lr": 0.1, "alpha": 1.0, "beta": 0.9}, ADDSIGN_A),
    "AddSign-B": (AddSign, {"lr": 0.01, "alpha": 0.1, "beta": 0.8}, ADDSIGN_B),
    "AddSign-C": (AddSign, {"lr": 0.1, "alpha": 1.0, "beta": 0.9, "linear": 10}, ADDSIGN_C),
    "PowerSign-A": (PowerSign, {"lr": 0.1, "alpha": math.e, "beta": 0.9}, POWERSIGN_A),
    "PowerSign-B": (PowerSign, {"lr": 0.1, "alpha": 10.0, "beta": 0.8}, POWERSIGN_B),
    "PowerSign-C": (PowerSign, {"lr": 0.1, "alpha": math.e, "beta": 0.9, "linear": 10}, POWERSIGN_C),
    "PowerSign-D": (PowerSign, {"lr": 0.01, "alpha": 2.0, "beta": 0.8}, POWERSIGN_D),
}

# TF's assertAllCloseAccordingToType: 1e-6 for float32/float64 (we hold float64 much tighter), 1e-3 for
# float16 and 1e-2 for bfloat16.
TOLERANCES = {
    torch.float64: 1e-14,
    torch.float32: 1e-6,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}


def _run(cls, config, dtype, foreach, steps=7, signs=(1, 1, 1, 1, -1, -1, -1)):
    config = dict(config)
    decay = LinearInternalDecay(config.pop("linear")) if "linear" in config else None
    var0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    var1 = torch.tensor([3.0, 4.0], dtype=dtype, requires_grad=True)
    opt = cls([var0, var1], sign_internal_decay=decay, foreach=foreach, **config)
    rows = []
    for t in range(steps):
        var0.grad = signs[t] * torch.tensor([0.1, 0.1], dtype=dtype)
        var1.grad = signs[t] * torch.tensor([0.01, 0.01], dtype=dtype)
        opt.step()
        rows.append(
            [
                *var0.detach().tolist(),
                *var1.detach().tolist(),
                opt.state[var0]["exp_avg"][0].item(),
                opt.state[var1]["exp_avg"][0].item(),
            ]
        )
    return rows


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tensorflow_golden_values(case, dtype, foreach):
    cls, config, expected = CASES[case]
    rows = _run(cls, config, dtype, foreach)
    tol = TOLERANCES[dtype]
    for t, (got, want) in enumerate(zip(rows, expected), start=1):
        torch.testing.assert_close(
            torch.tensor(got, dtype=torch.float64),
            torch.tensor(want, dtype=torch.float64),
            rtol=tol,
            atol=tol,
            msg=lambda m, t=t: f"{case} {dtype} step {t}: {m}",
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tensorflow_golden_values_low_precision(case, dtype):
    cls, config, expected = CASES[case]
    rows = _run(cls, config, dtype, foreach=False)
    tol = TOLERANCES[dtype]
    for got, want in zip(rows, expected):
        torch.testing.assert_close(
            torch.tensor(got[:4], dtype=torch.float64),
            torch.tensor(want[:4], dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )


@pytest.mark.parametrize(
    ("case", "steps"), [("AddSign-A", 3), ("AddSign-B", 3), ("AddSign-C", 3), ("PowerSign-D", 7)]
)
def test_tensorflow_sparse_configs(case, steps):
    # TF's testSparse cases: with both coordinates present they equal the dense values.
    cls, config, expected = CASES[case]
    rows = _run(cls, config, torch.float64, foreach=False, steps=steps)
    torch.testing.assert_close(torch.tensor(rows), torch.tensor(expected[:steps]), rtol=1e-14, atol=1e-14)


def test_steps_five_and_six_do_not_move_with_alpha_one():
    # AddSign alpha=1, no decay: sign(g) != sign(m) gives a zero multiplier, the parameters stay exactly put.
    rows = _run(AddSign, {"lr": 0.1, "alpha": 1.0, "beta": 0.9}, torch.float32, foreach=False)
    assert rows[3][:4] == rows[4][:4] == rows[5][:4]


def test_decay_is_evaluated_at_the_previous_step():
    # d(t-1): step 1 uses linear(10)(0) = 1 (var0 -> 0.98); d(t) would give multiplier 1.9 (var0 -> 0.981).
    var = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = AddSign([var], lr=0.1, sign_internal_decay=LinearInternalDecay(10))
    var.grad = torch.tensor([0.1], dtype=torch.float64)
    opt.step()
    assert var.item() == pytest.approx(0.98, abs=1e-15)
    seen = []
    opt2 = AddSign([torch.zeros(1, requires_grad=True)], sign_internal_decay=lambda s: seen.append(s) or 1.0)
    for _ in range(3):
        opt2.param_groups[0]["params"][0].grad = torch.ones(1)
        opt2.step()
    assert seen == [0, 1, 2]
