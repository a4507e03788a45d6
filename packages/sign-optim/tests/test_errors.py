"""Bad input gets a ValueError / TypeError that names the argument."""

import pytest
import torch

from altgrad.sign_optim import AddSign, LinearInternalDecay, PowerSign


def _params():
    return [torch.zeros(3, requires_grad=True)]


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lr": -1e-3}, ValueError, "lr"),
        ({"lr": "0.1"}, TypeError, "lr"),
        ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "Tensor lr"),
        ({"lr": torch.tensor(1e-3), "foreach": True}, ValueError, "lr as a Tensor"),
        ({"beta": -0.1}, ValueError, "beta"),
        ({"beta": 1.0}, ValueError, "beta"),
        ({"beta": 1.5}, ValueError, "beta"),
        ({"beta": None}, TypeError, "beta"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
        ({"alpha": "e"}, TypeError, "alpha"),
        ({"sign_internal_decay": 3}, TypeError, "sign_internal_decay"),
        ({"sign_internal_decay": "linear"}, TypeError, "sign_internal_decay"),
        ({"sign_internal_decay": {"kind": "linear", "T_max": 0}}, ValueError, "T_max"),
    ],
)
def test_invalid_hyperparameters(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(_params(), **kwargs)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf"), float("nan")])
def test_powersign_base_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha"):
        PowerSign(_params(), alpha=alpha)


def test_addsign_accepts_any_finite_alpha():
    for alpha in (-1.0, 0.0, 0.1, 2):
        # exact: the stored hyper-parameter itself
        assert AddSign(_params(), alpha=alpha).defaults["alpha"] == float(alpha)


@pytest.mark.parametrize("cls", [AddSign, PowerSign])
@pytest.mark.parametrize(
    ("group", "exc", "match"),
    [
        ({"lr": -1.0}, ValueError, "lr"),
        ({"beta": 2.0}, ValueError, "beta"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"sign_internal_decay": object()}, TypeError, "sign_internal_decay"),
    ],
)
def test_invalid_param_group_options(cls, group, exc, match):
    opt = cls(_params())
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **group})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("factory", "exc", "match"),
    [
        (lambda: LinearInternalDecay(0), ValueError, "T_max"),
        (
            lambda: AddSign(_params(), sign_internal_decay={"kind": "cosine", "T_max": 5, "zero_after": -1}),
            ValueError,
            "zero_after",
        ),
        (
            lambda: PowerSign(
                _params(), sign_internal_decay={"kind": "restart", "T_max": 5, "num_periods": 0}
            ),
            ValueError,
            "num_periods",
        ),
    ],
)
def test_invalid_decays(factory, exc, match):
    with pytest.raises(exc, match=match):
        factory()


def test_decay_returning_garbage_is_reported():
    p = torch.zeros(2, requires_grad=True)
    opt = AddSign([p], sign_internal_decay=lambda step: "one")
    p.grad = torch.ones(2)
    with pytest.raises(TypeError, match="sign_internal_decay must return a real number"):
        opt.step()


def test_base_class_errors_still_apply():
    with pytest.raises(ValueError, match="empty parameter list"):
        AddSign([])
    with pytest.raises(TypeError, match="iterable"):
        AddSign(torch.zeros(2, requires_grad=True))
    with pytest.raises(ValueError, match="non-leaf"):
        AddSign([torch.zeros(2, requires_grad=True) * 2])
