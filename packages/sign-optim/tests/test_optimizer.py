"""torch.optim behaviour: foreach == loop bit for bit, state_dict, schedulers, complex, compile, ..."""

import copy
import io
import math
import shutil
import warnings

import pytest
import torch

from altgrad.sign_optim import (
    AddSign,
    CosineInternalDecay,
    LinearInternalDecay,
    PowerSign,
    RestartCosineInternalDecay,
)

OPTIMIZERS = [AddSign, PowerSign]
CONFIGS = [
    {},
    {"lr": 0.01, "beta": 0.5, "alpha": 0.5},
    {"lr": 0.01, "sign_internal_decay": LinearInternalDecay(5)},
    {"lr": 0.01, "sign_internal_decay": CosineInternalDecay(6, num_periods=2, zero_after=1.5)},
    {"lr": 0.01, "sign_internal_decay": RestartCosineInternalDecay(4, num_periods=2)},
    {"lr": 0.01, "sign_internal_decay": lambda s: 2 - s / 10.0},
    {"lr": 0.01, "weight_decay": 0.1},
    {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 0.01, "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "maximize": True},
]
CONFIG_IDS = [
    "default",
    "beta-alpha",
    "linear",
    "cosine",
    "restart",
    "lambda",
    "wd",
    "decoupled-wd",
    "max-wd",
    "max",
]


def _bitwise_equal(a, b):
    assert a.dtype == b.dtype
    # exact: callers compare routes that are bit-identical by construction (see each call)
    assert torch.equal(
        a.view(torch.uint8) if a.is_complex() else a, b.view(torch.uint8) if b.is_complex() else b
    )
    # torch.equal treats -0.0 == 0.0 and fails on NaN; compare bits for floats as well.
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        # exact: as above, on the bit patterns
        assert torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _torch_foreach_model(dtype):
    """torch's test_foreach_matches_forloop model, with a 0-dim extra parameter."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
    ).to(dtype)
    extra = torch.nn.Parameter(torch.tensor(0.5, dtype=dtype))
    return model, extra


def _run_torch_style(cls, config, foreach, dtype):
    model, extra = _torch_foreach_model(dtype)
    params = [*model.parameters(), extra]
    opt = cls(params, foreach=foreach, **config)
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
    for i in range(7):
        if i == 3:
            model[2].requires_grad_(False)
        if i == 5:
            model[2].requires_grad_(True)
        opt.zero_grad()
        if i != 2:  # grads are None at i == 2
            loss = model(x).sum() + extra.sin()
            loss.backward()
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_foreach_matches_forloop_bitwise(cls, config, dtype):
    params_loop, opt_loop = _run_torch_style(cls, config, False, dtype)
    params_fe, opt_fe = _run_torch_style(cls, config, True, dtype)
    for p_loop, p_fe in zip(params_loop, params_fe):
        # exact: bit-parity by construction (CPU foreach ops loop the same per-tensor kernels)
        _bitwise_equal(p_loop.detach(), p_fe.detach())
        for key in ("exp_avg", "step"):
            _bitwise_equal(opt_loop.state[p_loop][key], opt_fe.state[p_fe][key])


def _near_zero_problem(dtypes, seed=0):
    """Parameters whose m lands within rounding of 0 at the first step: m_prev = -g (1 - beta) / beta."""
    gen = torch.Generator().manual_seed(seed)
    beta = 0.9
    items = []
    for dtype in dtypes:
        g = torch.randn(64, generator=gen, dtype=torch.float64)
        m_prev = -g * (1 - beta) / beta * (1 + 1e-7 * torch.randn(64, generator=gen, dtype=torch.float64))
        items.append((torch.randn(64, generator=gen).to(dtype), g.to(dtype), m_prev.to(dtype)))
    # The classic exact cancellation: m_prev = 1, g = -9.
    items.append((torch.ones(3), torch.full((3,), -9.0), torch.ones(3)))
    return items


@pytest.mark.parametrize("config", CONFIGS[:5], ids=CONFIG_IDS[:5])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_foreach_matches_forloop_with_m_near_zero_and_mixed_dtypes(cls, config):
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float32]
    results = []
    for foreach in (False, True):
        items = _near_zero_problem(dtypes)
        params = [torch.nn.Parameter(p.clone()) for p, _, _ in items]
        opt = cls(params, foreach=foreach, **config)
        for p, (_, g, m) in zip(params, items):
            p.grad = g.clone()
            opt.state[p]["step"] = torch.tensor(0.0)
            opt.state[p]["exp_avg"] = m.clone()
        opt.step()
        for p, (_, g, _) in zip(params, items):
            p.grad = -g.clone()
        opt.step()
        results.append([(p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in params])
    for (p_loop, m_loop), (p_fe, m_fe) in zip(*results):
        # exact: bit-parity by construction (CPU foreach ops loop the same per-tensor kernels)
        _bitwise_equal(p_loop, p_fe)
        _bitwise_equal(m_loop, m_fe)
    # The problem really exercises sign(m ~ 0): some m are tiny compared with g.
    items = _near_zero_problem(dtypes)
    tiny = [(m * 0.9 + 0.1 * g).abs().min().item() for _, g, m in items]
    assert min(tiny) < 1e-5


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_complex_params_match_view_as_real(cls, foreach):
    torch.manual_seed(0)
    a = torch.randn(10, 5, dtype=torch.complex64, requires_grad=True)
    b = torch.randn(10, dtype=torch.complex64, requires_grad=True)
    c = torch.randn(10, 5, dtype=torch.float32, requires_grad=True)
    real = [
        torch.view_as_real(a).detach().clone().requires_grad_(),
        torch.view_as_real(b).detach().clone().requires_grad_(),
        c.detach().clone().requires_grad_(),
    ]
    kwargs = {
        "lr": 0.01,
        "sign_internal_decay": LinearInternalDecay(5),
        "weight_decay": 0.01,
        "foreach": foreach,
    }
    opt_c = cls([a, b, c], **kwargs)
    opt_r = cls(real, **kwargs)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in (a, b, c)]
        for p, g in zip((a, b, c), grads):
            p.grad = g.clone()
        for p, g in zip(real, grads):
            p.grad = torch.view_as_real(g).clone() if g.is_complex() else g.clone()
        opt_c.step()
        opt_r.step()
        for p_c, p_r in zip((a, b, c), real):
            got = torch.view_as_real(p_c.detach()) if p_c.is_complex() else p_c.detach()
            # exact: by construction: complex params are stepped as their view_as_real pairs
            _bitwise_equal(got, p_r.detach())


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_lazily_conjugated_and_negated_grad_views(cls, foreach):
    # A conj-bit (or neg-bit) gradient used to reach view_as_real unresolved and raise.
    torch.manual_seed(0)
    z = torch.randn(5, dtype=torch.complex64)
    x = torch.randn(4)
    lazy = [z.conj(), torch._neg_view(x)]
    plain = [z.conj().resolve_conj(), -x]
    for weight_decay in (0.0, 0.1):
        results = []
        for grads in (lazy, plain):
            params = [
                torch.nn.Parameter(torch.ones(5, dtype=torch.complex64)),
                torch.nn.Parameter(torch.ones(4)),
            ]
            opt = cls(params, lr=0.1, weight_decay=weight_decay, foreach=foreach)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            results.append([torch.view_as_real(params[0].detach()), params[1].detach()])
        for a, b in zip(*results):
            _bitwise_equal(a, b)  # exact: same route (a lazy view holds the same values)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_grad_is_never_mutated(cls, foreach):
    torch.manual_seed(0)
    params = [
        torch.randn(4, 3, requires_grad=True),
        torch.randn(5, dtype=torch.complex64, requires_grad=True),
    ]
    opt = cls(
        params,
        lr=0.1,
        weight_decay=0.5,
        maximize=True,
        sign_internal_decay=LinearInternalDecay(3),
        foreach=foreach,
    )
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)  # exact: untouched


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_grad_is_a_noop_for_params_and_decays_m(cls, foreach):
    p = torch.randn(5, requires_grad=True)
    before = p.detach().clone()
    opt = cls([p], lr=0.1, foreach=foreach)
    p.grad = torch.ones(5)
    opt.step()
    after_first = p.detach().clone()
    m = opt.state[p]["exp_avg"].clone()
    p.grad = torch.zeros(5)
    opt.step()
    # exact: a zero gradient gives an exactly zero step (p - lr·k·0)
    assert torch.equal(p.detach(), after_first)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m * 0.9)
    assert not torch.equal(before, after_first)  # exact: any change counts


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_params_without_grad_are_skipped(cls):
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    b_before = b.detach().clone()
    opt = cls([a, b], weight_decay=0.1, decoupled_weight_decay=True)
    a.grad = torch.ones(3)
    opt.step()
    assert b not in opt.state
    assert torch.equal(b.detach(), b_before)  # exact: untouched
    assert opt.state[a]["step"].item() == 1  # exact: integer-valued step counter


def _quadratic(seed=0, non_contiguous=False):
    torch.manual_seed(seed)
    if non_contiguous:
        weight = torch.randn(10, 5, 2)[..., 0].requires_grad_()
        bias = torch.randn(10, 2)[..., 0].requires_grad_()
    else:
        weight = torch.randn(10, 5, requires_grad=True)
        bias = torch.randn(10, requires_grad=True)
    x = torch.randn(5)
    return weight, bias, lambda: (weight.mv(x) + bias).pow(2).sum()


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("non_contiguous", [False, True])
@pytest.mark.parametrize("config", CONFIGS[:6], ids=CONFIG_IDS[:6])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_goes_right_direction_with_closure_and_scheduler(cls, config, non_contiguous, maximize):
    weight, bias, loss_fn = _quadratic(non_contiguous=non_contiguous)
    config = {**config, "lr": 0.01}
    opt = cls([{"params": [weight]}, {"params": [bias], "lr": 0.005}], maximize=maximize, **config)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)
    initial = loss_fn().item()

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(20):
        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
        scheduler.step()
    final = loss_fn().item()
    assert final > initial if maximize else final < initial
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**2)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005 * 0.9**2)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_lr_scheduler_values_are_used(cls, foreach):
    """ExponentialLR gives the same trajectory as setting lr by hand before each step."""
    results = []
    for use_scheduler in (True, False):
        weight, bias, loss_fn = _quadratic()
        opt = cls([weight, bias], lr=0.02, foreach=foreach)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5) if use_scheduler else None
        for i in range(4):
            if scheduler is None:
                for group in opt.param_groups:
                    group["lr"] = 0.02 * 0.5**i
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
        results.append(weight.detach().clone())
    # exact: same route: lr·0.5ⁱ is exact in binary, so the scheduler's lr equals the manual one
    assert torch.equal(*results)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_reduce_lr_on_plateau(cls):
    weight, bias, loss_fn = _quadratic()
    opt = cls([weight, bias], lr=0.01)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        scheduler.step(1.0)  # constant metric: plateau
    assert opt.param_groups[0]["lr"] < 0.01


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_state_dict_round_trip_weights_only(cls, config, foreach):
    weight, bias, loss_fn = _quadratic()
    opt = cls(
        [
            {"params": [weight]},
            {"params": [bias], "lr": 0.003, "sign_internal_decay": LinearInternalDecay(7)},
        ],
        foreach=foreach,
        **config,
    )
    for _ in range(5):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    state = opt.state_dict()
    loaded = _save_load(state)
    assert loaded["param_groups"] == state["param_groups"]
    for key, value in state["state"].items():
        for name in ("step", "exp_avg"):
            assert torch.equal(loaded["state"][key][name], value[name])  # exact: restored state
    # A fresh optimizer (constructed with the same arguments, so a plain callable is present again)
    # continues exactly like the original one.
    weight2 = weight.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    opt2 = cls([{"params": [weight2]}, {"params": [bias2]}], foreach=foreach, **config)
    opt2.load_state_dict(loaded)
    assert opt2.param_groups[1]["sign_internal_decay"] == {"kind": "linear", "T_max": 7}
    x = torch.randn(5)
    for _ in range(5):
        for w, b, o in ((weight, bias, opt), (weight2, bias2, opt2)):
            o.zero_grad()
            (w.mv(x) + b).pow(2).sum().backward()
            o.step()
    assert torch.equal(weight, weight2)  # exact: same route from a restored state
    assert torch.equal(bias, bias2)  # exact: same route from a restored state
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_callable_decay_is_not_saved_and_must_be_passed_again(cls):
    weight, bias, loss_fn = _quadratic()
    opt = cls([weight, bias], sign_internal_decay=lambda step: 0.5)
    loss_fn().backward()
    opt.step()
    state = _save_load(opt.state_dict())
    assert state["param_groups"][0]["sign_internal_decay"] == {"kind": "callable"}
    fresh = cls([weight, bias])
    fresh.load_state_dict(state)
    with pytest.raises(RuntimeError, match="callable sign_internal_decay"):
        fresh.step()
    again = cls([weight, bias], sign_internal_decay=lambda step: 0.5)
    again.load_state_dict(state)
    again.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_decay_objects_are_stored_as_plain_data(cls):
    p = torch.zeros(2, requires_grad=True)
    opt = cls([p], sign_internal_decay=RestartCosineInternalDecay(100, num_periods=4, zero_after=3))
    assert opt.param_groups[0]["sign_internal_decay"] == {
        "kind": "restart",
        "T_max": 100,
        "num_periods": 4.0,
        "zero_after": 3.0,
    }
    opt.add_param_group(
        {"params": [torch.zeros(1, requires_grad=True)], "sign_internal_decay": CosineInternalDecay(9)}
    )
    assert opt.param_groups[1]["sign_internal_decay"]["kind"] == "cosine"
    # A spec dict is accepted too (and validated).
    opt.add_param_group(
        {
            "params": [torch.zeros(1, requires_grad=True)],
            "sign_internal_decay": {"kind": "linear", "T_max": 3},
        }
    )
    assert "AddSign" in repr(opt) or "PowerSign" in repr(opt)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_load_non_tensor_step_and_old_state_dict(cls):
    weight, bias, loss_fn = _quadratic()
    opt = cls([weight, bias], lr=0.01, sign_internal_decay=LinearInternalDecay(10))
    loss_fn().backward()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    for s in state["state"].values():
        s["step"] = s["step"].item()
    for group in state["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay"):
            del group[key]
    opt2 = cls([weight, bias], lr=0.01)
    opt2.load_state_dict(state)
    assert torch.is_tensor(opt2.state[weight]["step"])
    assert opt2.param_groups[0]["maximize"] is False
    opt2.step()
    assert opt2.state[weight]["step"].item() == 2  # exact: integer-valued step counter


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_tensor_lr_matches_float_lr(cls):
    results = []
    for lr in (1e-2, torch.tensor(1e-2)):
        weight, bias, loss_fn = _quadratic()
        opt = cls([weight, bias], lr=lr, foreach=False)
        for _ in range(5):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        results.append(weight.detach().clone())
    # exact: same route: eager reads a tensor lr as a float, both round to one float32 scalar
    assert torch.equal(*results)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_deepcopy_and_hooks(cls):
    weight, bias, loss_fn = _quadratic()
    opt = cls([weight, bias], sign_internal_decay=lambda s: 1.0)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    loss_fn().backward()
    opt.step()
    assert calls == ["pre", "post"]
    clone = copy.deepcopy(opt)
    assert clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert clone._sign_decay_fns.keys() == opt._sign_decay_fns.keys()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_differentiable_step_gradcheck(cls):
    """float64 gradcheck of one step w.r.t. params, grad and the running average (torch's test)."""

    def step_fn(p, grad, exp_avg):
        p = p.clone()
        p.grad = grad
        opt = cls([p], lr=0.1, beta=0.8, differentiable=True, sign_internal_decay=LinearInternalDecay(4))
        opt.state[p]["step"] = torch.tensor(1.0, dtype=torch.float64)
        opt.state[p]["exp_avg"] = exp_avg.clone()
        opt.step()
        return p, opt.state[p]["exp_avg"]

    torch.manual_seed(0)
    p = torch.rand(10, dtype=torch.float64, requires_grad=True)
    grad = torch.rand(10, dtype=torch.float64, requires_grad=True)
    exp_avg = torch.rand(10, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # setting .grad of a non-leaf tensor
        assert torch.autograd.gradcheck(step_fn, (p, grad, exp_avg))


def _compile_available():
    return (
        shutil.which("cc") is not None or shutil.which("gcc") is not None or shutil.which("g++") is not None
    )


_needs_cc = pytest.mark.skipif(not _compile_available(), reason="inductor on CPU needs a C++ compiler")


def _compiled_vs_eager_bound(params, grads_seen, lr, cls, steps):
    """Largest |compiled - eager| allowed after ``steps`` float32 steps (per parameter).

    The compiled kernel may contract multiply-adds into FMAs and use another exp; each of the
    about 8 rounded ops of a step may then round differently on the two sides, by at most u
    (float32 unit roundoff) times the magnitude it handles: |p| for the parameter, lr k |g| for
    the update (k <= alpha + 1 for AddSign, base for PowerSign, with |d| <= 1). Differences add
    up over the steps and are not amplified, as long as no sign(m) flips (checked by the caller).
    """
    u = torch.finfo(torch.float32).eps / 2
    k_max = 2.0 if cls is AddSign else math.e
    g_max = max(float(g.abs().max()) for g in grads_seen)
    return [steps * 8 * u * (float(p.detach().abs().max()) + 1 + lr * k_max * g_max) for p in params]


@pytest.mark.parametrize(
    ("cls", "foreach", "backend"),
    [
        (AddSign, False, "aot_eager"),
        (AddSign, True, "aot_eager"),
        (PowerSign, False, "aot_eager"),
        (PowerSign, True, "aot_eager"),
        pytest.param(AddSign, False, "inductor", marks=_needs_cc),
        pytest.param(PowerSign, True, "inductor", marks=_needs_cc),
    ],
)
def test_torch_compile_step(cls, foreach, backend):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    params = [torch.randn(10, 10, requires_grad=True), torch.randn(10, requires_grad=True)]
    params_eager = [p.detach().clone().requires_grad_() for p in params]
    kwargs = {"lr": 0.01, "sign_internal_decay": CosineInternalDecay(6, num_periods=2), "foreach": foreach}
    opt = cls(params, **kwargs)
    opt_eager = cls(params_eager, **kwargs)
    compiled_step = torch.compile(opt.step, backend=backend)
    frames_before = None
    grads_seen = []
    min_abs_m = math.inf
    for i in range(6):
        grads = [torch.randn_like(p) for p in params]
        grads_seen += grads
        for p, pe, g in zip(params, params_eager, grads):
            p.grad = g.clone()
            pe.grad = g.clone()
        compiled_step()
        opt_eager.step()
        min_abs_m = min(
            min_abs_m, *(float(opt_eager.state[pe]["exp_avg"].abs().min()) for pe in params_eager)
        )
        if i == 1:
            frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # No recompilation once the state exists: the decay is computed from the step tensor.
    assert frames_before > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
    bounds = _compiled_vs_eager_bound(params_eager, grads_seen, 0.01, cls, 6)
    # The bound assumes no sign(m) differs: every |m| stays far above m's own rounding error
    # (at most 6 steps x 4u x (|m| + |g|) <= 6 x 4 x 6e-8 x 10 = 1.5e-5 here).
    assert min_abs_m > 1.5e-5
    for p, pe, bound in zip(params, params_eager, bounds):
        torch.testing.assert_close(p, pe, rtol=0, atol=bound)
        torch.testing.assert_close(
            opt.state[p]["exp_avg"], opt_eager.state[pe]["exp_avg"], rtol=0, atol=bound
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_capturable_matches_cpu(cls, foreach):
    torch.manual_seed(0)
    cpu = [torch.randn(100, requires_grad=True), torch.randn(7, 3, requires_grad=True)]
    cuda = [p.detach().cuda().requires_grad_() for p in cpu]
    kwargs = {"lr": 0.01, "sign_internal_decay": LinearInternalDecay(5)}
    opt_cpu = cls(cpu, foreach=False, **kwargs)
    opt_cuda = cls(cuda, foreach=foreach, capturable=True, **kwargs)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in cpu]
        for p, q, g in zip(cpu, cuda, grads):
            p.grad = g.clone()
            q.grad = g.cuda()
        opt_cpu.step()
        opt_cuda.step()
    assert opt_cuda.state[cuda[0]]["step"].device.type == "cuda"
    for p, q in zip(cpu, cuda):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_cuda_foreach_matches_forloop(cls):
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [
            torch.randn(1000, device="cuda", dtype=d, requires_grad=True)
            for d in (torch.float32, torch.float16, torch.float64)
        ]
        opt = cls(params, lr=0.01, foreach=foreach, sign_internal_decay=LinearInternalDecay(3))
        for _ in range(4):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        # exact: the package's bit-parity promise; on CUDA the fused foreach kernels must match too
        _bitwise_equal(a, b)


def test_powersign_base_one_is_sgd():
    torch.manual_seed(0)
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    start = p.detach().clone()
    opt = PowerSign([p], lr=0.1, alpha=1.0)
    g = torch.randn(6, dtype=torch.float64)
    p.grad = g
    opt.step()
    torch.testing.assert_close(p.detach(), start - 0.1 * g, rtol=0, atol=1e-15)
    assert math.isclose(opt.param_groups[0]["alpha"], 1.0)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_foreach_cpu_chunking_keeps_results_bitwise(cls, monkeypatch):
    """The CPU foreach path splits a bucket into chunks to bound its temporaries; results are unchanged."""
    import altgrad.sign_optim._functional as functional

    results = []
    for foreach, chunk in ((False, None), (True, None), (True, 7)):
        if chunk is not None:
            monkeypatch.setattr(functional, "_CPU_CHUNK_NUMEL", chunk)
        params, _opt = _run_torch_style(
            cls,
            {"lr": 0.01, "sign_internal_decay": LinearInternalDecay(4), "maximize": True},
            foreach,
            torch.float32,
        )
        assert len(functional._chunks([p.detach() for p in params])) == (1 if chunk is None else 3)
        results.append([p.detach().clone() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            _bitwise_equal(a, b)  # exact: bit-parity by construction (chunks only split the per-tensor loop)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_torch_compile_capturable_with_tensor_lr(cls, foreach):
    """The all-tensor path (capturable, tensor lr, decay from the step tensor) agrees with eager floats.

    Eager capturable needs an accelerator; under torch.compile the same code runs on the CPU.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    params = [torch.randn(6, 4, requires_grad=True), torch.randn(4, requires_grad=True)]
    params_eager = [p.detach().clone().requires_grad_() for p in params]
    decay = RestartCosineInternalDecay(5, num_periods=2, zero_after=3)
    opt = cls(
        params,
        lr=torch.tensor(0.01),
        capturable=True,
        foreach=foreach,
        sign_internal_decay=decay,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    )
    opt_eager = cls(
        params_eager,
        lr=0.01,
        foreach=False,
        sign_internal_decay=decay,
        weight_decay=0.1,
        decoupled_weight_decay=True,
    )
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    grads_seen = []
    min_abs_m = math.inf
    for _ in range(7):
        for p, pe in zip(params, params_eager):
            g = torch.randn_like(p)
            grads_seen.append(g)
            p.grad = g.clone()
            pe.grad = g
        compiled_step()
        opt_eager.step()
        min_abs_m = min(
            min_abs_m, *(float(opt_eager.state[pe]["exp_avg"].abs().min()) for pe in params_eager)
        )
    # The tensor path computes lr * wd and the decay as float32 tensors, not float64 scalars: the
    # same per-op roundings as the compiled-vs-eager bound, with no sign(m) flip (checked).
    assert min_abs_m > 7 * 4 * 6e-8 * 10
    for p, pe, bound in zip(
        params, params_eager, _compiled_vs_eager_bound(params_eager, grads_seen, 0.01, cls, 7)
    ):
        torch.testing.assert_close(p, pe, rtol=0, atol=bound)
    assert opt.state[params[0]]["step"].item() == 7  # exact: integer-valued step counter
