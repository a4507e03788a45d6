"""Sparse gradients with TensorFlow's ``_apply_sparse`` semantics (tf.contrib.opt AddSign / PowerSign).

TensorFlow (``optimizer.py`` / ``addsign.py`` / ``powersign.py``):
1. ``_apply_sparse_duplicate_indices`` sums the slices of duplicate indices first;
2. ``m_t = assign(m, m * beta + grad * (1 - beta))`` densifies the gradient: the ``m`` of every row
   decays, untouched rows by ``beta``;
3. ``scatter_sub(var, indices, lr * multiplier * grad.values)``: only the touched rows of the
   variable move, with ``multiplier`` from ``sign(gather(m_t, indices)) * sign(grad.values)``.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from altgrad.sign_optim import AddSign, LinearInternalDecay, PowerSign

# TensorFlow's testSparse: var0 = [1, 2] with g0 = [0.1, 0.1], var1 = [3, 4] with g1 = [0.01, 0.01], both as
# IndexedSlices with indices [0, 1]. Rows: (var0[0], var0[1], var1[0], var1[1], m(var0), m(var1)) after step t,
# recomputed in float64 from TF's numpy reference (reference/sign-optim.md section 3).
ADDSIGN_A = [  # lr=0.1, alpha=1, beta=0.9; 3 steps of +g (TF's loop is range(1, 4))
    (0.98, 1.98, 2.998, 3.998, 0.009999999999999998, 0.0009999999999999998),
    (0.96, 1.96, 2.9960000000000004, 3.9960000000000004, 0.018999999999999996, 0.0018999999999999998),
    (0.94, 1.94, 2.9940000000000007, 3.9940000000000007, 0.027099999999999996, 0.0027099999999999997),
]
ADDSIGN_B = [  # lr=0.01, alpha=0.1, beta=0.8
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
]
ADDSIGN_C = [  # lr=0.1, alpha=1, beta=0.9, linear decay (10 steps), d(t-1)
    (0.98, 1.98, 2.998, 3.998, 0.009999999999999998, 0.0009999999999999998),
    (0.961, 1.961, 2.9961, 3.9961, 0.018999999999999996, 0.0018999999999999998),
    (0.943, 1.943, 2.9943000000000004, 3.9943000000000004, 0.027099999999999996, 0.0027099999999999997),
]
POWERSIGN_A = [  # lr=0.1, base=e, beta=0.9; 7 steps, +g for t <= 4, -g after
    (0.9728171817154095, 1.9728171817154097, 2.997281718171541, 3.997281718171541, 0.01, 0.001),
    (0.9456343634308191, 1.9456343634308193, 2.994563436343082, 3.994563436343082, 0.019, 0.0019),
    (0.9184515451462286, 1.918451545146229, 2.991845154514623, 3.991845154514623, 0.0271, 0.00271),
    (0.8912687268616382, 1.8912687268616386, 2.989126872686164, 3.989126872686164, 0.03439, 0.003439),
    (0.8949475212733525, 1.894947521273353, 2.989494752127335, 3.989494752127335, 0.020951, 0.0020951),
    (0.8986263156850669, 1.8986263156850676, 2.9898626315685064, 3.9898626315685064, 0.0088559, 0.00088559),
    (
        0.9258091339696574,
        1.925809133969658,
        2.9925809133969654,
        3.9925809133969654,
        -0.00202969,
        -0.000202969,
    ),
]
POWERSIGN_D = [  # lr=0.01, base=2, beta=0.8
    (0.998, 1.998, 2.9998, 3.9998, 0.02, 0.002),
    (0.996, 1.996, 2.9996, 3.9996, 0.036, 0.0036),
    (0.994, 1.994, 2.9994, 3.9994, 0.0488, 0.00488),
    (0.992, 1.992, 2.9992, 3.9992, 0.05904, 0.005904),
    (0.9924999999999999, 1.9925, 2.99925, 3.99925, 0.027232, 0.0027232),
    (0.9929999999999999, 1.9929999999999999, 2.9993, 3.9993, 0.0017856, 0.00017856),
    (0.9949999999999999, 1.9949999999999999, 2.9995, 3.9995, -0.01857152, -0.001857152),
]
POWERSIGN_C = [  # lr=0.1, base=e, beta=0.9, linear decay (10 steps), d(t-1)
    (0.9728171817154095, 1.9728171817154097, 2.997281718171541, 3.997281718171541, 0.01, 0.001),
    (0.94822115060384, 1.9482211506038403, 2.994822115060384, 3.994822115060384, 0.019, 0.0019),
    (0.9259657413189154, 1.9259657413189155, 2.9925965741318916, 3.9925965741318916, 0.0271, 0.00271),
    (0.9058282142442107, 1.9058282142442107, 2.9905828214244212, 3.9905828214244212, 0.03439, 0.003439),
    (0.9113163306051509, 1.911316330605151, 2.9911316330605153, 3.9911316330605153, 0.020951, 0.0020951),
    (0.9173816372022773, 1.9173816372022774, 2.991738163720228, 3.991738163720228, 0.0088559, 0.00088559),
    (0.93229988417869, 1.93229988417869, 2.9932299884178692, 3.9932299884178692, -0.00202969, -0.000202969),
]

TF_SPARSE_CASES = {
    "AddSign-default": (AddSign, {"lr": 0.1, "alpha": 1.0, "beta": 0.9}, ADDSIGN_A, (1, 1, 1)),
    "AddSign-lr0.01-alpha0.1-beta0.8": (
        AddSign,
        {"lr": 0.01, "alpha": 0.1, "beta": 0.8},
        ADDSIGN_B,
        (1, 1, 1),
    ),
    "AddSign-linear10": (AddSign, {"lr": 0.1, "alpha": 1.0, "beta": 0.9, "linear": 10}, ADDSIGN_C, (1, 1, 1)),
    "PowerSign-default": (
        PowerSign,
        {"lr": 0.1, "alpha": math.e, "beta": 0.9},
        POWERSIGN_A,
        (1,) * 4 + (-1,) * 3,
    ),
    "PowerSign-lr0.01-base2-beta0.8": (
        PowerSign,
        {"lr": 0.01, "alpha": 2.0, "beta": 0.8},
        POWERSIGN_D,
        (1,) * 4 + (-1,) * 3,
    ),
    "PowerSign-linear10": (
        PowerSign,
        {"lr": 0.1, "alpha": math.e, "beta": 0.9, "linear": 10},
        POWERSIGN_C,
        (1,) * 4 + (-1,) * 3,
    ),
}


def _sparse(values, indices, size):
    return torch.sparse_coo_tensor(torch.tensor([indices]), values, size, check_invariants=True)


def _run_tf_case(cls, config, signs, dtype, sparse, foreach=False):
    config = dict(config)
    decay = LinearInternalDecay(config.pop("linear")) if "linear" in config else None
    var0 = torch.tensor([1.0, 2.0], dtype=dtype, requires_grad=True)
    var1 = torch.tensor([3.0, 4.0], dtype=dtype, requires_grad=True)
    opt = cls([var0, var1], sign_internal_decay=decay, foreach=foreach, **config)
    rows = []
    for sign in signs:
        g0 = sign * torch.tensor([0.1, 0.1], dtype=dtype)
        g1 = sign * torch.tensor([0.01, 0.01], dtype=dtype)
        var0.grad = _sparse(g0, [0, 1], (2,)) if sparse else g0
        var1.grad = _sparse(g1, [0, 1], (2,)) if sparse else g1
        opt.step()
        rows.append(
            [
                *var0.tolist(),
                *var1.tolist(),
                opt.state[var0]["exp_avg"][0].item(),
                opt.state[var1]["exp_avg"][0].item(),
            ]
        )
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(TF_SPARSE_CASES))
def test_tensorflow_sparse_test_values(case, dtype, foreach):
    cls, config, expected, signs = TF_SPARSE_CASES[case]
    got = _run_tf_case(cls, config, signs, dtype, sparse=True, foreach=foreach)
    want = torch.tensor(expected, dtype=torch.float64)
    # Error bound: the inputs round once (u |x|); each step rounds var once (u |var|) and the update
    # u lr k |g| a few times (k <= base = e: below u |var|); m rounds <= 3 times per step
    # (u (|m| + |g|)), and it contracts by beta, so errors do not grow beyond steps x per-step.
    # No sign flips: the smallest |m| (1.8e-4) is far above m's bound in float32/64 (< 1e-10).
    u = torch.finfo(dtype).eps / 2
    n = len(signs)
    tol_var = (n + 1) * 3 * u * want[:, :4].abs()
    tol_m = (n + 1) * 3 * u * (want[:, 4:].abs() + torch.tensor([0.1, 0.01], dtype=torch.float64))
    assert (got[:, :4] - want[:, :4]).abs().le(tol_var).all(), (got[:, :4] - want[:, :4]).abs().max()
    assert (got[:, 4:] - want[:, 4:]).abs().le(tol_m).all(), (got[:, 4:] - want[:, 4:]).abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", sorted(TF_SPARSE_CASES))
def test_tensorflow_sparse_cases_equal_dense_low_precision(case, dtype):
    # TF runs its sparse tests in half as well; with every index present the sparse update is the dense
    # update (whose low-precision values test_golden.py holds to TF's tolerances), bit for bit: the
    # gathered rows are the whole tensor, so the same kernels see the same inputs.
    cls, config, _, signs = TF_SPARSE_CASES[case]
    sparse = _run_tf_case(cls, config, signs, dtype, sparse=True)
    dense = _run_tf_case(cls, config, signs, dtype, sparse=False)
    # exact: same route (every row present: the same kernels on the same layout)
    assert torch.equal(sparse, dense)


def _tf_sparse_reference(rule, var, m, indices, values, lr, beta, alpha, d):
    """TF's _apply_sparse in float64 numpy: dedupe, densified m update, scatter_sub on touched rows."""
    var, m = var.copy(), m.copy()
    uniq = sorted(set(indices))
    summed = {i: sum(values[j] for j in range(len(indices)) if indices[j] == i) for i in uniq}
    dense = np.zeros_like(m)
    for i in uniq:
        dense[i] = summed[i]
    m = m * beta + dense * (1 - beta)
    for i in uniq:
        s = np.sign(m[i]) * np.sign(summed[i])
        k = alpha + d * s if rule == "add" else alpha ** (d * s)
        var[i] = var[i] - lr * k * summed[i]
    return var, m


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_embedding_only_touched_rows_move_and_every_m_decays(cls):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(12, 5, sparse=True, dtype=torch.float64)
    alpha = 0.7 if cls is AddSign else 3.0
    opt = cls(emb.parameters(), lr=0.05, beta=0.8, alpha=alpha, sign_internal_decay=LinearInternalDecay(4))
    var = emb.weight.detach().numpy().copy()
    m = np.zeros_like(var)
    batches = [[1, 1, 4, 7], [4, 2, 4], [11, 0, 0, 1, 4], [3]]  # duplicates within a batch
    for t, batch in enumerate(batches, start=1):
        idx = torch.tensor(batch)
        weights = torch.randn(len(batch), 5, dtype=torch.float64)
        emb.zero_grad()
        (emb(idx) * weights).sum().backward()
        assert emb.weight.grad.is_sparse
        before = emb.weight.detach().clone()
        opt.step()
        d = max(0.0, (4 - min(t - 1, 4)) / 4)
        var, m = _tf_sparse_reference(
            "add" if cls is AddSign else "power", var, m, batch, weights.numpy(), 0.05, 0.8, alpha, d
        )
        # Error bound (float64): each step rounds each value a few times (u = 1.1e-16, |values| < 10,
        # 4 steps): 4 x 8 x 1.1e-16 x 10 < 1e-13. Every nonzero |m| is far above that (checked below), so
        # no sign is decided by rounding.
        np.testing.assert_allclose(emb.weight.detach().numpy(), var, rtol=0, atol=1e-13)
        np.testing.assert_allclose(opt.state[emb.weight]["exp_avg"].numpy(), m, rtol=0, atol=1e-13)
        untouched = sorted(set(range(12)) - set(batch))
        # exact: untouched
        assert torch.equal(emb.weight.detach()[untouched], before[untouched])  # never written
    assert np.abs(m[np.abs(m) > 0]).min() > 1e-10


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_sparse_equals_dense_on_the_summed_gradient(cls, dtype):
    # Every row touched (with duplicates): the gathered rows are the whole tensor, so the sparse update
    # must equal the dense update of the coalesced gradient bit for bit, for every dtype.
    gen = torch.Generator().manual_seed(3)
    shape = (6, 3)
    p_sparse = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    p_dense = torch.nn.Parameter(p_sparse.detach().clone())
    kwargs = {"lr": 0.1, "maximize": True, "sign_internal_decay": LinearInternalDecay(3)}
    opt_sparse, opt_dense = cls([p_sparse], **kwargs), cls([p_dense], **kwargs)
    for _ in range(4):
        rows = torch.cat([torch.randperm(6, generator=gen), torch.randint(0, 6, (4,), generator=gen)])
        values = torch.randn(len(rows), 3, generator=gen, dtype=torch.float64).to(dtype)
        grad = torch.sparse_coo_tensor(rows[None], values, shape, check_invariants=True)
        p_sparse.grad = grad
        p_dense.grad = grad.coalesce().to_dense()
        opt_sparse.step()
        opt_dense.step()
        # exact: same route (every row present: the same kernels on the same layout)
        assert torch.equal(p_sparse.detach(), p_dense.detach())
        # exact: same route, as above
        assert torch.equal(opt_sparse.state[p_sparse]["exp_avg"], opt_dense.state[p_dense]["exp_avg"])


def test_duplicate_indices_are_summed_first():
    # TF sums duplicate slices before the update: indices [1, 1] with values [0.5, -0.2] act as one +0.3,
    # so sign(g) = +1 (applying the slices one by one would give one step of each sign).
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    opt = AddSign([p], lr=0.1, alpha=1.0, beta=0.9)
    p.grad = torch.sparse_coo_tensor(
        [[1, 1]], torch.tensor([0.5, -0.2], dtype=torch.float64), (3,), check_invariants=True
    )
    opt.step()
    # m = 0.1 * 0.3 = 0.03 > 0, s = +1, multiplier 2: p[1] = 2 - 0.1 * 2 * 0.3 = 1.94.
    assert p.tolist() == pytest.approx([1.0, 1.94, 3.0], abs=1e-15)
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.0, 0.03, 0.0], abs=1e-17)


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_sparse_and_dense_params_foreach_matches_forloop(cls):
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(20, 4, sparse=True)
        lin = torch.nn.Linear(4, 1)
        opt = cls([*emb.parameters(), *lin.parameters()], lr=0.01, foreach=foreach)
        for _ in range(4):
            opt.zero_grad()
            lin(emb(torch.randint(0, 20, (8,)))).sum().backward()
            opt.step()
        results.append([emb.weight.detach(), lin.weight.detach(), opt.state[emb.weight]["exp_avg"]])
    for a, b in zip(*results):
        # exact: bit-parity by construction (both paths run sparse_sign_update; CPU foreach loops)
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
def test_tensor_lr_sparse_matches_float_lr(cls):
    out = []
    for lr in (0.05, torch.tensor(0.05)):
        p = torch.nn.Parameter(torch.arange(8.0).reshape(4, 2))
        opt = cls([p], lr=lr)
        for step in range(3):
            p.grad = torch.sparse_coo_tensor(
                [[step, 3]], torch.tensor([[1.0, -2.0], [0.5, 0.25]]), (4, 2), check_invariants=True
            )
            opt.step()
        out.append(p.detach().clone())
    # exact: same route: eager reads a tensor lr as a float, both round to one float32 scalar
    assert torch.equal(*out)


@pytest.mark.parametrize(
    ("option", "value"), [("weight_decay", 0.1), ("differentiable", True), ("capturable", True)]
)
def test_sparse_with_unsupported_option_raises_before_any_update(option, value):
    dense = torch.nn.Parameter(torch.ones(3))
    emb = torch.nn.Parameter(torch.ones(4, 2))
    opt = AddSign([{"params": [dense]}, {"params": [emb], option: value}], lr=0.1)
    dense.grad = torch.ones(3)
    emb.grad = torch.sparse_coo_tensor([[0]], torch.ones(1, 2), (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match=f"param group 1 has {option}={value!r}.*sparse"):
        opt.step()
    # exact: untouched (failed call)
    assert torch.equal(dense.detach(), torch.ones(3))  # group 0 was not stepped either
    assert not opt.state


def test_sparse_layouts_other_than_coo_are_refused():
    # torch refuses a CSR .grad on a strided parameter today; the optimizer's own check names the layout
    # should one arrive (e.g. through a tensor subclass).
    p = torch.nn.Parameter(torch.zeros(2, 3))
    opt = PowerSign([p])
    with warnings.catch_warnings():  # CSR is a beta feature of torch
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(
            torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.ones(2), (2, 3), check_invariants=True
        )
    with pytest.raises(RuntimeError, match=r"sparse COO layout only.*sparse_csr"):
        opt._check_sparse(0, opt.param_groups[0], csr)
