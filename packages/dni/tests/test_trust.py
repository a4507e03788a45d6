"""Issue 12: eval mode is the plain network; copies train on their own; torch.compile trains or refuses."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def train(dni: DNI, data) -> None:
    """The wrapper steps the hidden layers; plain SGD steps the last one."""
    head = dni.network[4]
    for x, y in data:
        for p in head.parameters():
            p.grad = None
        F.cross_entropy(dni(x), y).backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.1 * p.grad
    dni.step_synthesizers()


def params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def make(**kwargs) -> DNI:
    kwargs.setdefault("grad_optim", "sgd")
    return DNI(mlp(), hidden_size=4, grad_lr=0.1, lr=0.2, **kwargs)


# ---------------------------------------------------------------- item 4: eval mode is the plain network
@pytest.mark.parametrize("mode", ["dni", "observe", "backprop"])
def test_eval_mode_backward_is_plain_autograd(mode):
    dni = make(mode=mode)
    train(dni, batches(3))  # non-zero synthesizers, Adam-free state
    plain = mlp(seed=3)
    plain.load_state_dict(dni.network.state_dict())
    dni.eval()
    dni.network.zero_grad()  # drop the head's gradient left by training
    before = params(dni.network)
    x, y = batches(1, seed=7)[0]
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    for _ in range(2):  # two backward passes: .grad must accumulate (2x), nothing may be stepped
        F.cross_entropy(dni(xa), y).backward()
    for _ in range(2):
        F.cross_entropy(plain(xb), y).backward()
    # exact: same route (eval mode runs the plain network's kernels on equal weights)
    assert torch.equal(xa.grad, xb.grad)  # saliency map: the true input gradient
    for p0, p, q in zip(before, dni.network.parameters(), plain.parameters()):
        assert torch.equal(p.detach(), p0)  # exact: untouched; not trained by a backward pass in eval mode
        # exact: same route as the plain network
        assert torch.equal(p.grad, q.grad)  # accumulated exactly as in plain autograd


@pytest.mark.parametrize("mode", ["dni", "observe"])
def test_gradients_from_eval_mode_do_not_leak_into_training(mode):
    data = batches(3)
    clean, used = make(mode=mode), make(mode=mode)
    train(clean, data[:1])
    train(used, data[:1])
    used.eval()
    x = data[1][0].clone().requires_grad_(True)
    used(x).sum().backward()  # a saliency map: fills the wrapped layers' .grad
    used.train()
    train(clean, data[1:])
    train(used, data[1:])
    for a, b in zip(params(clean.network), params(used.network)):
        # exact: same route (identical training; the eval-mode gradients are dropped)
        assert torch.equal(a, b)


def test_backprop_mode_steps_wrapped_layers_from_the_true_gradient():
    """mode="backprop": interfaces bypassed, the wrapper still owns the hidden layers' SGD update (lr 0.2)."""
    dni = make(mode="backprop")
    ref = mlp()
    x, y = batches(1)[0]
    F.cross_entropy(ref(x), y).backward()
    before = params(dni.network)
    F.cross_entropy(dni(x), y).backward()
    eps = torch.finfo(torch.float32).eps
    for i in (0, 2):  # wrapped: stepped during backward with the true gradient, .grad consumed
        for p0, p, q in zip(params(ref[i]), dni.network[i].parameters(), ref[i].parameters()):
            # SGD's vectorised update may fuse p0 - 0.2·g into one FMA (one rounding); the reference rounds
            # the product and the difference (two roundings of eps/2 each, relative):
            # |diff| <= (eps/2)·|0.2 g| + eps·|p0 - 0.2 g| <= 1.5 eps·(|p0| + |0.2 g|).
            step = 0.2 * q.grad
            bound = 2 * eps * (p0.abs() + step.abs()).max().item()
            torch.testing.assert_close(p.detach(), p0 - step, rtol=0, atol=bound)
            assert p.grad is None
    for p0, p, q in zip(before[4:], dni.network[4].parameters(), ref[4].parameters()):
        # exact: untouched
        assert torch.equal(p.detach(), p0)  # the unwrapped head is left to the user's optimizer
        # exact: same route (backprop mode is plain autograd on equal weights)
        assert torch.equal(p.grad, q.grad)


# ---------------------------------------------------------------- item 5: copies train on their own
def _roundtrip(kind: str, dni: DNI) -> DNI:
    if kind == "deepcopy":
        return copy.deepcopy(dni)
    if kind == "pickle":
        return pickle.loads(pickle.dumps(dni))
    buf = io.BytesIO()
    torch.save(dni, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("grad_optim", ["sgd", "adam"])
def test_copies_train_independently_and_like_the_original(kind, grad_optim):
    dni = make(grad_optim=grad_optim)
    train(dni, batches(2))  # optimizer state and synthesizers are non-trivial before copying
    twin = _roundtrip(kind, dni)
    frozen = params(dni)
    more = batches(3, seed=5)
    train(twin, more)
    # exact: untouched
    assert all(torch.equal(a, b) for a, b in zip(frozen, params(dni)))  # the copy's training left dni alone
    moved = [not torch.equal(a, b) for a, b in zip(frozen, params(twin))]  # exact: any change counts
    assert all(moved[:4])  # the copy's wrapped layers (0 and 2) are updated by its own hooks
    train(dni, more)  # the same data on the original gives bit-identical weights
    for a, b in zip(params(dni), params(twin)):
        # exact: same route (a copy runs the same kernels on the same state and data)
        assert torch.equal(a, b)


def test_copy_remove_does_not_unhook_the_original():
    dni = make()
    twin = copy.deepcopy(dni)
    twin.remove()
    before = params(dni.network[0])
    train(dni, batches(3))
    assert not torch.equal(before[0], dni.network[0].weight)  # exact: any change counts


# ---------------------------------------------------------------- item 6: torch.compile
def test_torch_compile_of_the_wrapper_trains_like_eager():
    eager, compiled_dni = make(grad_optim="adam"), make(grad_optim="adam")
    compiled = torch.compile(compiled_dni)
    data = batches(3)
    train(eager, data)
    head = compiled_dni.network[4]
    for x, y in data:
        for p in head.parameters():
            p.grad = None
        F.cross_entropy(compiled(x), y).backward()
        with torch.no_grad():
            for p in head.parameters():
                p -= 0.1 * p.grad
    compiled_dni.step_synthesizers()
    # The wrapper's forward runs eagerly under torch.compile (torch.compiler.disable): the same operations in
    # the same order, so the numbers are bit-identical.
    for a, b in zip(params(eager), params(compiled_dni)):
        assert torch.equal(a, b)  # exact: same route (the wrapper runs eagerly under compile)


class Outer(nn.Module):
    """pytorch-dni's tasks/mnist/fcn.py shape: DNI(recursive=False) on blocks inside a user model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            DNI(
                nn.Sequential(nn.Linear(6 if i == 0 else 8, 8), nn.Tanh()),
                hidden_size=4,
                grad_optim="sgd",
                grad_lr=0.1,
                lr=0.2,
                recursive=False,
            )
            for i in range(2)
        )
        self.final = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.final(x)


def test_torch_compile_of_a_model_containing_wrappers_trains_like_eager():
    eager, inner = Outer(), Outer()
    compiled = torch.compile(inner, backend="aot_eager")  # graph breaks around each wrapper
    for model in (eager, compiled):
        for x, y in batches(3):
            model.final.zero_grad()
            F.cross_entropy(model(x), y).backward()
            with torch.no_grad():
                for p in model.final.parameters():
                    p -= 0.1 * p.grad
    # aot_eager runs the same ATen kernels as eager on the compiled (final layer, loss) region; only the
    # decomposition of the loss may reorder a float32 reduction over 16 rows: ≤ 16·2⁻²⁴ relative per value,
    # times 3 steps of lr ≤ 0.2 on O(1) gradients -> 1e-5 absolute is a safe bound.
    for a, b in zip(params(eager), params(inner)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # exact: any change counts (trained vs fresh)
    assert not torch.equal(params(Outer())[0], params(inner)[0])  # the wrapped blocks were trained
