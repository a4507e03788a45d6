"""Weight sharing (issue 12 item 8): a module used at several places, a Parameter tied across layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import altgrad.es_layers as es

N = 4
DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64; batched vs per-member sums of < 20 terms differ by a few ulps


def _dense(layer):
    e, eps = layer.dense_noise()
    return e, (eps if eps is not None else torch.zeros(N, layer.out_features, dtype=DT))


@pytest.mark.parametrize("mode", ["iid", "lowrank", "flipout", "permuted"])
def test_module_used_twice_is_converted_everywhere(mode):
    torch.manual_seed(0)
    lin = nn.Linear(3, 3, dtype=DT)
    net = nn.Sequential(lin, nn.Tanh(), lin)  # the same module at "0" and "2"
    pm = es.perturb(net, N, mode=mode, seed=1)
    assert net[0] is net[2]
    assert isinstance(net[0], es.Perturbed)
    assert len(pm.perturbed_layers) == 1
    pm.set_noise(0.3)
    x = torch.randn(2 * N, 3, dtype=DT)
    with torch.no_grad():
        y = pm(x)
    e, eps = _dense(net[0])
    rows = []
    for i in range(2 * N):  # both uses see the member's W + s E_k (one perturbation of the shared parameter)
        k, s = i % N, (1.0 if i < N else -1.0)
        w, b = lin.weight + s * e[k], lin.bias + s * eps[k]
        rows.append(F.linear(torch.tanh(F.linear(x[i], w, b)), w, b))
    torch.testing.assert_close(y, torch.stack(rows), **TOL)
    wts = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    pm.set_grad(wts)
    torch.testing.assert_close(lin.weight.grad, torch.einsum("k,kij->ij", wts, e), **TOL)


@pytest.mark.parametrize("mode", ["iid", "lowrank", "flipout", "permuted"])
def test_tied_parameter_gets_one_perturbation_and_one_term(mode):
    # issue 22: every use of a tied weight sees the same E_k, and the update counts Σ w_k E_k once (the old code
    # drew independent noise per layer and summed both terms)
    torch.manual_seed(0)
    l1, l2 = nn.Linear(3, 3, dtype=DT), nn.Linear(3, 3, dtype=DT)
    l2.weight = l1.weight  # tied weight, separate biases
    net = nn.Sequential(l1, nn.Tanh(), l2)
    pm = es.perturb(net, N, mode=mode, seed=2)
    assert net[0].weight is net[2].weight
    pm.set_noise(0.3)
    wts = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    e1, b1 = _dense(net[0])
    e2, b2 = _dense(net[2])
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)  # exact: the same stream regenerated (same key)
    assert not torch.allclose(b1, b2)  # the separate biases keep independent noise
    expected = torch.einsum("k,kij->ij", wts, e1)
    for method in ("set_grad", "update"):
        net.zero_grad(set_to_none=True)
        getattr(pm, method)(wts, l2=0.5)
        # one term, and l2 acts once on the parameter
        torch.testing.assert_close(net[0].weight.grad, expected + 0.5 * net[0].weight.detach(), **TOL)
    grads = pm.es_grads(wts)
    assert set(grads) == {name for name, _ in net.named_parameters()}  # one entry per parameter
    torch.testing.assert_close(grads["0.weight"], expected, **TOL)
    x = torch.randn(N, 3, dtype=DT)
    with torch.no_grad():
        y = pm(x)
    w = net[0].weight
    ref = torch.stack(
        [
            F.linear(
                torch.tanh(F.linear(x[k], w + e1[k], net[0].bias + b1[k])), w + e1[k], net[2].bias + b2[k]
            )
            for k in range(N)
        ]
    )
    torch.testing.assert_close(y, ref, **TOL)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3, dtype=DT)
        self.head = nn.Linear(3, 5, bias=False, dtype=DT)
        self.head.weight = self.emb.weight  # tied input/output embedding

    def forward(self, idx):
        return self.head(self.emb(idx))


@pytest.mark.parametrize("mode", ["iid", "lowrank", "flipout"])
def test_embedding_tied_with_the_output_layer_shares_its_noise(mode):
    torch.manual_seed(0)
    net = _Tied()
    pm = es.perturb(net, N, mode=mode, seed=3)
    plan = {e.name: e for e in pm.es_plan()}
    assert set(plan) == {"emb.weight"}
    assert plan["emb.weight"].also == ("head.weight",)
    assert plan["emb.weight"].path == "embedding, linear"
    pm.set_noise(0.3)
    e, _ = net.head.dense_noise()
    idx = torch.tensor([[0, 4], [1, 1], [3, 2], [2, 0], [4, 4], [0, 1], [2, 2], [3, 0]])
    with torch.no_grad():
        y = pm(idx)
    for i in range(2 * N):
        k, s = i % N, (1.0 if i < N else -1.0)
        w = net.emb.weight + s * e[k]
        torch.testing.assert_close(y[i], F.linear(F.embedding(idx[i], w), w), **TOL)
    wts = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    pm.set_grad(wts)
    torch.testing.assert_close(net.emb.weight.grad, torch.einsum("k,kij->ij", wts, e), **TOL)


def test_parameter_shared_with_an_excluded_module_is_refused():
    with pytest.raises(ValueError, match=r"head\.weight.*shared with 'emb'"):
        es.perturb(_Tied(), N, mode="lowrank", include=lambda name, m: name == "head")


def test_include_must_agree_on_every_name_of_a_shared_module():
    lin = nn.Linear(3, 3)
    net = nn.Sequential(lin, nn.Tanh(), lin)
    with pytest.raises(ValueError, match=r"'0' and '2'"):
        es.perturb(net, N, include=lambda name, m: name == "0")
    assert type(net[0]) is nn.Linear  # nothing was converted
