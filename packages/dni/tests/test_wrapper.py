"""The DNI wrapper: pytorch-dni API with the paper's semantics."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI, RNNDNI, Conv2dDNI, LinearBatchNormDNI, LinearDNI


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_wraps_every_parameterised_leaf_but_the_last():
    dni = DNI(mlp(), hidden_size=4)
    assert sorted(dni.wrapped_modules()) == ["0", "2"]
    assert sorted(dni.interfaces) == ["0", "2"]  # created eagerly: sizes inferred from nn.Linear
    assert sorted(DNI(mlp(), skip_last_layer=False).wrapped_modules()) == ["0", "2", "4"]


@pytest.mark.parametrize("mode_kwargs", [{"mode": "observe"}, {"lam": 1.0}, {"mode": "backprop"}])
def test_backprop_equivalent_modes_give_identical_gradients(mode_kwargs):
    net, ref = mlp(), mlp()
    dni = DNI(net, hidden_size=4, update_modules=False, **mode_kwargs)
    x, y = data()
    F.cross_entropy(dni(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        # exact: bit-parity by construction (observe, λ=1, backprop pass g itself)
        assert torch.equal(p.grad, q.grad)


def test_zero_init_gives_zero_upstream_gradient_at_step_zero():
    dni = DNI(mlp(), hidden_size=4, update_modules=False)
    x, y = data()
    x.requires_grad_(True)
    out = dni(x)
    # Synthetic gradients were applied during the forward pass and are exactly zero.
    for name in ("0", "2"):
        for p in dni.wrapped_modules()[name].parameters():
            assert p.grad is not None
            assert torch.count_nonzero(p.grad) == 0
    F.cross_entropy(out, y).backward()
    assert torch.count_nonzero(x.grad) == 0
    assert torch.count_nonzero(dni.network[4].weight.grad) > 0  # the last layer learns from the loss


def test_wrapped_modules_are_updated_during_the_forward_pass():
    net = mlp()
    dni = DNI(net, hidden_size=4, grad_optim="sgd", grad_lr=0.1, lr=0.5)
    x, y = data()
    # Step 0 trains the top synthesizer on the true gradient; step 1 bootstraps the lower one from it.
    for _ in range(2):
        F.cross_entropy(dni(x), y).backward()
    before = [p.detach().clone() for p in net.parameters()]
    dni(x)  # forward only: no loss, no backward
    after = list(net.parameters())
    # exact: any change counts
    assert not torch.equal(before[0], after[0])  # layer 0 updated from its synthetic gradient
    assert not torch.equal(before[2], after[2])  # exact: any change counts
    assert torch.equal(before[4], after[4])  # exact: untouched; the unwrapped last layer waits for the loss
    assert all(p.grad is None for p in net[0].parameters())  # the wrapper cleared what it consumed


def test_dni_trains_a_small_classifier():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, :3] + 0.1 * torch.randn(256, 3)).argmax(1)
    net = mlp()
    dni = DNI(net, hidden_size=16, grad_lr=1e-3, lr=1e-2, context_size=3)
    opt = torch.optim.Adam(net[4].parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(dni(x, context=y), y).backward()
        opt.step()
    dni.eval()
    acc = (dni(x).argmax(1) == y).float().mean()
    assert acc > 0.9, float(acc)


def test_synthesizer_parameters_are_separate_from_model_parameters():
    dni = DNI(mlp(), hidden_size=4)
    synth = {id(p) for p in dni.synthesizer_parameters()}
    model = {id(p) for p in dni.model_parameters()}
    assert synth
    assert not synth & model
    assert synth | model == {id(p) for p in dni.parameters()}


def test_eval_mode_bypasses_the_interfaces():
    dni = DNI(mlp(), hidden_size=4, update_modules=False)
    dni.eval()
    x, _ = data()
    out = dni(x)
    assert out.grad_fn is not None
    assert all(p.grad is None for p in dni.parameters())
    torch.testing.assert_close(out, mlp()(x))


def test_warmup_runs_in_observe_mode_then_switches():
    net, ref = mlp(), mlp()
    dni = DNI(net, hidden_size=4, update_modules=False, warmup_steps=1)
    x, y = data()
    F.cross_entropy(dni(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    # exact: bit-parity by construction (observe passes g itself)
    assert torch.equal(net[0].weight.grad, ref[0].weight.grad)  # step 0: backprop
    net.zero_grad()
    F.cross_entropy(dni(x), y).backward()
    # exact: any change counts
    assert not torch.equal(net[0].weight.grad, ref[0].weight.grad)  # step 1: synthetic gradients
    assert dni.num_steps == 2


def test_conditional_dni_context_manager_and_keyword_agree():
    x, y = data()
    outs = []
    for use_kwarg in (True, False):
        net = mlp()
        dni = DNI(net, hidden_size=4, context_size=3, grad_optim="sgd", grad_lr=0.5, lr=0.1)
        for _ in range(3):
            if use_kwarg:
                out = dni(x, context=y)
            else:
                with dni.context(F.one_hot(y, 3).float()):
                    out = dni(x)
            F.cross_entropy(out, y).backward()
        outs.append(net[0].weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1])
    with pytest.raises(ValueError, match="conditional"):
        DNI(mlp(), hidden_size=4, context_size=3)(x)


def test_recursive_false_wraps_a_block_and_conv_synthesizers_work():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    layer = DNI(
        block,
        hidden_size=3,
        dni_network=Conv2dDNI,
        dni_params={"kernel_size": 3},
        recursive=False,
        context_size=2,
    )
    assert list(layer.interfaces) == ["root"]
    head = nn.Linear(4 * 5 * 5, 2)
    x, y = torch.randn(3, 2, 5, 5), torch.tensor([0, 1, 1])
    for _ in range(2):
        F.cross_entropy(head(layer(x, context=y).flatten(1)), y).backward()
    assert layer.diagnostics()[""]["loss"] > 0


def test_lazy_synthesizers_and_tuple_outputs():
    class Block(nn.Module):  # activation size not inferable from the type
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5))

        def forward(self, x):
            return x @ self.w

    net = nn.Sequential(Block(), nn.Linear(5, 2))
    dni = DNI(net, hidden_size=4)
    with pytest.raises(RuntimeError, match="sample_input"):
        list(dni.synthesizer_parameters())
    x, _ = data()
    dni(x)
    assert len(list(dni.synthesizer_parameters())) == 6
    eager = DNI(nn.Sequential(Block(), nn.Linear(5, 2)), hidden_size=4, sample_input=x)
    assert len(list(eager.synthesizer_parameters())) == 6

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(6, 5, batch_first=True)
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            out, (h, _) = self.rnn(x)
            assert not h.requires_grad  # the decoupled module's other outputs are cut off too
            return self.head(out[:, -1])

    model = Model()
    dni = DNI(model, hidden_size=4, dni_network=RNNDNI)
    dni(torch.randn(2, 3, 6)).sum().backward()
    assert list(dni.interfaces) == ["rnn"]


def test_state_dict_keys_are_names_and_reload_in_a_fresh_process(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    def build():
        return nn.Sequential(Block(), nn.Linear(8, 8), nn.Linear(8, 3))

    torch.manual_seed(0)
    dni = DNI(build(), hidden_size=4, dni_network=LinearBatchNormDNI, context_size=3)
    x, y = data()
    for _ in range(3):
        F.cross_entropy(dni(x, context=y), y).backward()
    keys = list(dni.state_dict())
    assert "interfaces.0/lin.synthesizer.final.weight" in keys
    assert "interfaces.1.synthesizer.final.weight" in keys
    dni.eval()
    expected = {
        name: dni.interfaces[name].synthetic_gradient(torch.ones(2, 8), torch.tensor([0, 2])).tolist()
        for name in dni.interfaces
    }
    torch.save(dni.state_dict(), tmp_path / "dni.pt")
    script = textwrap.dedent(
        f"""
        import json, torch
        from torch import nn
        from altgrad.dni import DNI, LinearBatchNormDNI

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = nn.Linear(6, 8)

            def forward(self, x):
                return torch.tanh(self.lin(x))

        torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
        dni = DNI(nn.Sequential(Block(), nn.Linear(8, 8), nn.Linear(8, 3)), hidden_size=4,
                  dni_network=LinearBatchNormDNI, context_size=3)
        dni.load_state_dict(torch.load({str(tmp_path / "dni.pt")!r}, weights_only=True))
        dni.eval()
        out = {{n: dni.interfaces[n].synthetic_gradient(torch.ones(2, 8), torch.tensor([0, 2])).tolist()
               for n in dni.interfaces}}
        print(json.dumps({{"sg": out, "steps": dni.num_steps}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout)
    assert loaded["steps"] == 3
    assert set(loaded["sg"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(torch.tensor(loaded["sg"][name]), torch.tensor(value))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    net = mlp().to(dtype)
    dni = DNI(net, hidden_size=8, context_size=3, grad_optim="sgd", grad_lr=0.1, lr=0.01)
    x, y = data()
    x = x.to(dtype)
    for _ in range(3):
        out = dni(x, context=y)
        assert out.dtype == dtype
        F.cross_entropy(out.float(), y).backward()
    for p in dni.parameters():
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
    assert dni.interface("0").last_loss.dtype == torch.float32
    sg = dni.interface("0").synthetic_gradient(torch.ones(2, 8, dtype=dtype), y[:2])
    assert sg.dtype == dtype
    assert torch.count_nonzero(sg) > 0


def test_attribute_access_is_forwarded_to_the_network():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.b(self.a(x))

        def describe(self):
            return "net"

    dni = DNI(Net())
    assert dni.describe() == "net"
    assert dni.b is dni.network.b
    assert isinstance(copy.deepcopy(dni), DNI)


def test_bad_input():
    with pytest.raises(ValueError, match="no trainable parameters"):
        DNI(nn.ReLU(), recursive=False)
    with pytest.raises(ValueError, match="no leaf module with trainable parameters"):
        DNI(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="skip_last_layer"):
        DNI(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"net must be an nn\.Module"):
        DNI(lambda x: x)
    with pytest.raises(ValueError, match="unknown grad_optim 'adamz'"):
        DNI(mlp(), grad_optim="adamz")
    with pytest.raises(TypeError, match="optim"):
        DNI(mlp(), optim=3)
    with pytest.raises(TypeError, match="hidden_size"):
        DNI(mlp(), hidden_size=0)
    with pytest.raises(TypeError, match="dni_network"):
        DNI(mlp(), dni_network=LinearDNI(2, 2, 2))
    with pytest.raises(ValueError, match="lam"):
        DNI(mlp(), λ=2.0)
    with pytest.raises(ValueError, match="mode"):
        DNI(mlp(), mode="dnii")
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(ValueError, match="Conv2dDNI"):
        DNI(conv)
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4, 2))
    with pytest.raises(ValueError, match=r"\(B, C, L\) feature maps.*use dni_network=Conv1dDNI"):
        DNI(conv1d)
    with pytest.raises(ValueError, match=r"Conv2dDNI predicts \(B, C, H, W\) gradients.*Conv1dDNI"):
        DNI(conv1d, modules=["0"], dni_network=Conv2dDNI)

    class Custom(nn.Module):  # not recognisable as a conv: caught at the first forward
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.w

    dni = DNI(nn.Sequential(Custom(), nn.Linear(3, 2)), sample_input=torch.randn(2, 3))
    with pytest.raises(ValueError, match="cannot produce"):
        dni(torch.randn(2, 5, requires_grad=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_backprop_in_observe_mode_and_trains_in_dni_mode():
    net, ref = mlp().cuda(), mlp().cuda()
    dni = DNI(net, hidden_size=4, update_modules=False, mode="observe")
    x, y = (t.cuda() for t in data())
    F.cross_entropy(dni(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)  # exact: bit-parity by construction (observe passes g itself)
    dni = DNI(mlp().cuda(), hidden_size=4, context_size=3)
    for _ in range(3):
        F.cross_entropy(dni(x, context=y), y).backward()
    assert next(dni.synthesizer_parameters()).is_cuda
    assert all(torch.isfinite(p).all() for p in dni.parameters())


def test_modules_selects_blocks_and_remove_restores_the_network():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU()),
        nn.Linear(8, 3),
    )
    dni = DNI(net, hidden_size=4, modules=["0", "1"], context_size=3)
    assert sorted(dni.interfaces) == ["0", "1"]  # sizes inferred through Linear → BatchNorm1d → ReLU
    x, y = data()
    F.cross_entropy(dni(x, context=y), y).backward()
    assert dni.interface("1").last_loss is not None
    bare = dni.remove()
    out = bare(x)
    assert out.grad_fn is not None  # no interface any more: plain autograd graph
    with pytest.raises(ValueError, match="no submodule named 'nope'"):
        DNI(mlp(), modules=["nope"])
    with pytest.raises(TypeError, match="iterable of module names"):
        DNI(mlp(), modules="0")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"inject": "deferred"}, {"lam": 0.5}, {"mode": "observe"}],
    ids=["unlocked", "deferred", "lam", "observe"],
)
def test_an_in_place_activation_after_an_interface_trains_as_the_out_of_place_one(kwargs):
    """``ReLU(inplace=True)`` right after a wrapped layer (torchvision's models do it) modifies the interface's
    output in place; autograd forbids that on a view made inside a custom Function, so the boundary returns an
    alias instead. Same gradients, synthesizer gradients and synthesizer targets as with ``ReLU()``."""

    def run(inplace: bool):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(6, 8),
            nn.ReLU(inplace=inplace),
            nn.Linear(8, 8),
            nn.ReLU(inplace=inplace),
            nn.Linear(8, 3),
        )
        dni = DNI(net, hidden_size=4, update_modules=False, grad_optim=None, diagnostics=True, **kwargs)
        with torch.no_grad():  # non-zero synthesizers, so that the synthetic gradients are not all zero
            for p in dni.synthesizer_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        x, y = data()
        F.cross_entropy(dni(x), y).backward()
        grads = [p.grad.clone() for p in [*net.parameters(), *dni.synthesizer_parameters()]]
        return grads, [dni.interface(n).last_target for n in ("0", "2")]

    grads, targets = run(True)
    ref_grads, ref_targets = run(False)
    assert all(g.abs().sum() > 0 for g in grads[:4])  # both wrapped layers received a gradient
    # Same ops on the same values; relu_ and relu differ only in which tensor their backward masks by (the
    # output rather than the input, the same mask): equal up to float32 rounding of identical sums.
    for g, r in zip([*grads, *targets], [*ref_grads, *ref_targets], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
