"""The wrapper on the models users train: a transformer layer, an LSTM, a Conv1d, tied weights, a block used twice.

Each test runs one training step of :class:`~altgrad.dni.DNI` (``update_modules=False`` so that the gradients stay
in ``.grad``) and recomputes, from scratch with plain autograd on a copy of the model, what the paper's semantics
say the step must produce:

* the wrapped module's gradient: its synthetic gradient ``ŝ = M(h)`` back-propagated into it at forward time
  (plus, for tied weights, the true gradient the loss sends to the other use of the weight);
* the synthesizer's target: the gradient arriving at ``h`` from above, with ``h`` cut from the module (the true
  loss gradient, or the synthetic gradient of a later prediction back-propagated to it: bootstrapping);
* the synthesizer's gradient: that of ``‖M(h) − target‖² / B``.

With ``grad_optim=None`` the synthesizer gradients are back-propagated as targets arrive; with ``grad_optim="sgd"``
the wrapper collects them and back-propagates them in one pass before its update, checked through that update.
Tolerances: the same float32 operations in another order (autograd accumulates a gradient received along two
paths in its own order), a few units of rounding of the O(1) values here: rtol 1e-5, atol 1e-6.
"""

import copy
import linecache
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altgrad.dni import DNI, Conv1dDNI

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-zero synthesizers: the zero-initialised last layer would make every synthetic gradient 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _wrap(net: nn.Module, grad_optim: str | None, **kwargs) -> DNI:
    dni = DNI(
        net,
        hidden_size=8,
        update_modules=False,
        grad_optim=grad_optim,
        grad_lr=0.1,
        diagnostics=True,
        **kwargs,
    )
    for i, p in enumerate(dni.interfaces.values()):
        _randomise(p.synthesizer, 100 + i)
    return dni


def _check(
    dni: DNI, grads: dict[str, torch.Tensor], synth_grads: dict[str, list[torch.Tensor]], before
) -> None:
    """Compare the wrapper's gradients (and, with an SGD synthesizer optimizer, its update) with the reference."""
    params = dict(dni.network.named_parameters())
    for name, expected in grads.items():
        torch.testing.assert_close(params[name].grad, expected, **TOL)
    if dni.grad_optimizer is None:
        for key, expected in synth_grads.items():
            for p, e in zip(dni.interfaces[key].synthesizer.parameters(), expected, strict=True):
                torch.testing.assert_close(p.grad, e, **TOL)
        return
    dni.step_synthesizers()  # back-propagates the collected gradients, then one SGD step (lr 0.1)
    for key, expected in synth_grads.items():
        for p, p0, e in zip(dni.interfaces[key].synthesizer.parameters(), before[key], expected, strict=True):
            torch.testing.assert_close(p.detach(), p0 - 0.1 * e, **TOL)


def _synth_grads(
    synth: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor]
) -> list[torch.Tensor]:
    """Gradient of Σ ‖M(h) − target‖² / B over the predictions, with plain autograd."""
    loss = sum(((synth(x)[0] - t) ** 2).sum() / x.shape[0] for x, t in zip(inputs, targets, strict=True))
    return list(torch.autograd.grad(loss, list(synth.parameters())))


def _snapshot(dni: DNI) -> dict[str, list[torch.Tensor]]:
    return {k: [p.detach().clone() for p in i.synthesizer.parameters()] for k, i in dni.interfaces.items()}


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_a_transformer_encoder_layer(grad_optim):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    net = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 1])
    dni = _wrap(
        net, grad_optim, modules=["0"], sample_input=x
    )  # the layer does not tell its width: a dry run
    synth = copy.deepcopy(dni.interfaces["0"].synthesizer)
    before = _snapshot(dni)
    F.cross_entropy(dni(x), y).backward()

    h = ref[0](x)
    sg = synth(h.detach())[0]
    grads = dict(
        zip(
            [f"0.{n}" for n, _ in ref[0].named_parameters()],
            torch.autograd.grad(h, list(ref[0].parameters()), sg),
        )
    )
    cut = h.detach().requires_grad_()
    (target,) = torch.autograd.grad(F.cross_entropy(ref[2](ref[1](cut)), y), cut)
    torch.testing.assert_close(dni.interfaces["0"].last_target, target, **TOL)
    _check(dni, grads, {"0": _synth_grads(synth, [h.detach()], [target])}, before)


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_an_lstm_with_format_fn(grad_optim):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    net = Model()
    ref = copy.deepcopy(net)
    dni = _wrap(net, grad_optim, modules=["rnn"], format_fn=lambda out: out[0])
    synth = copy.deepcopy(dni.interfaces["rnn"].synthesizer)
    before = _snapshot(dni)
    x, y = torch.randn(3, 7, 4), torch.tensor([2, 0, 1])
    F.cross_entropy(dni(x), y).backward()

    h, _ = ref.rnn(x)
    sg = synth(h.detach())[0]
    names = [f"rnn.{n}" for n, _ in ref.rnn.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(h, list(ref.rnn.parameters()), sg)))
    cut = h.detach().requires_grad_()
    (target,) = torch.autograd.grad(F.cross_entropy(ref.head(cut[:, -1]), y), cut)
    torch.testing.assert_close(dni.interfaces["rnn"].last_target, target, **TOL)
    _check(dni, grads, {"rnn": _synth_grads(synth, [h.detach()], [target])}, before)


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_a_conv1d_with_its_convolutional_synthesizer(grad_optim):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 2))
    ref = copy.deepcopy(net)
    dni = _wrap(
        net,
        grad_optim,
        modules=["0"],
        dni_network=Conv1dDNI,
        dni_params={"num_layers": 1, "batch_norm": False},
    )
    synth = copy.deepcopy(dni.interfaces["0"].synthesizer)
    before = _snapshot(dni)
    x, y = torch.randn(5, 3, 9), torch.tensor([0, 1, 1, 0, 1])
    F.cross_entropy(dni(x), y).backward()

    h = ref[0](x)
    sg = synth(h.detach())[0]
    grads = dict(zip(["0.weight", "0.bias"], torch.autograd.grad(h, list(ref[0].parameters()), sg)))
    cut = h.detach().requires_grad_()
    (target,) = torch.autograd.grad(F.cross_entropy(ref[3](ref[2](ref[1](cut))), y), cut)
    torch.testing.assert_close(dni.interfaces["0"].last_target, target, **TOL)
    _check(dni, grads, {"0": _synth_grads(synth, [h.detach()], [target])}, before)


class TiedLM(nn.Module):
    """Embedding → Linear → tanh → output projection tied to the embedding (GPT-2's wte / lm_head)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.emb(tokens))))


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_tied_embedding_and_output_projection(grad_optim):
    """The embedding is wrapped; the tied projection reads the same weight, so the weight's gradient is its
    synthetic gradient (at forward time) plus the true gradient of the projection's use (in the backward)."""
    torch.manual_seed(0)
    net = TiedLM()
    ref = copy.deepcopy(net)
    dni = _wrap(net, grad_optim, modules=["emb"])
    synth = copy.deepcopy(dni.interfaces["emb"].synthesizer)
    before = _snapshot(dni)
    tokens, y = torch.randint(0, 11, (3, 4)), torch.randint(0, 11, (3, 4))

    def loss_of(logits):
        return F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1))

    loss_of(dni(tokens)).backward()

    h = ref.emb(tokens)
    sg = synth(h.detach())[0]
    (from_sg,) = torch.autograd.grad(h, [ref.emb.weight], sg)
    cut = h.detach().requires_grad_()
    target, from_head, body_w, body_b = torch.autograd.grad(
        loss_of(ref.head(torch.tanh(ref.body(cut)))), [cut, ref.emb.weight, ref.body.weight, ref.body.bias]
    )
    grads = {"emb.weight": from_sg + from_head, "body.weight": body_w, "body.bias": body_b}
    torch.testing.assert_close(dni.interfaces["emb"].last_target, target, **TOL)
    _check(dni, grads, {"emb": _synth_grads(synth, [h.detach()], [target])}, before)


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_a_block_registered_under_two_names_and_called_twice(grad_optim):
    """One ``nn.Linear`` registered as ``a`` and ``b`` is one wrapped module (``a``) with one synthesizer, which
    predicts twice per forward. The first prediction's target is the second's synthetic gradient back-propagated
    through the block (bootstrapping); the second's is the true gradient from the head."""
    block = nn.Linear(4, 4)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = block
            self.b = block
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    net = Twice()
    ref = copy.deepcopy(net)
    dni = _wrap(net, grad_optim)
    assert sorted(dni.wrapped_modules()) == ["a"]
    synth = copy.deepcopy(dni.interfaces["a"].synthesizer)
    before = _snapshot(dni)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 0])
    F.cross_entropy(dni(x), y).backward()

    h1 = ref.a(x)
    sg1 = synth(h1.detach())[0]
    cut1 = h1.detach().requires_grad_()
    h2 = ref.a(torch.relu(cut1))
    sg2 = synth(h2.detach())[0]
    # The block's gradient: both synthetic gradients (nothing else reaches it: both uses are cut).
    g1 = torch.autograd.grad(h1, list(ref.a.parameters()), sg1)
    (target1, *g2) = torch.autograd.grad(h2, [cut1, *ref.a.parameters()], sg2)
    cut2 = h2.detach().requires_grad_()
    target2, head_w, head_b = torch.autograd.grad(
        F.cross_entropy(ref.head(cut2), y), [cut2, *ref.head.parameters()]
    )
    grads = {"a.weight": g1[0] + g2[0], "a.bias": g1[1] + g2[1], "head.weight": head_w, "head.bias": head_b}
    torch.testing.assert_close(dni.interfaces["a"].last_target, target2, **TOL)
    synth_grads = _synth_grads(synth, [h1.detach(), h2.detach()], [target1, target2])
    _check(dni, grads, {"a": synth_grads}, before)


class _Attend(nn.Module):
    """Self-attention as a layer of a Sequential (``nn.MultiheadAttention`` takes query, key and value)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("grad_optim", [None, "sgd"])
def test_recursive_wraps_multihead_attention_whole(grad_optim):
    """``recursive=True`` wraps the modules that hold parameters. ``nn.MultiheadAttention`` holds ``in_proj_weight``
    itself and reads its ``out_proj``'s weights without calling it: it is wrapped whole (before, its leaf
    ``out_proj`` got an interface that no forward reached, and ``in_proj`` was trained by the true gradient
    through the uncut attention). Every attention weight gets the attention output's synthetic gradient; the
    linear layer below gets its own, and its synthesizer's target is the attention's synthetic gradient
    back-propagated to its output (bootstrapping)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), _Attend(), nn.Flatten(), nn.Linear(5 * 8, 3))
    ref = copy.deepcopy(net)
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 2, 1])
    dni = _wrap(net, grad_optim, sample_input=x)
    assert list(dni.wrapped_modules()) == ["0", "1.mha"]
    synth = {k: copy.deepcopy(i.synthesizer) for k, i in dni.interfaces.items()}
    before = _snapshot(dni)
    F.cross_entropy(dni(x), y).backward()

    h1 = ref[0](x)
    cut1 = h1.detach().requires_grad_()
    h2 = ref[1](cut1)
    s1, s2 = synth["0"](h1.detach())[0], synth["1/mha"](h2.detach())[0]
    attn = list(ref[1].parameters())
    g2 = torch.autograd.grad(
        h2, [*attn, cut1], s2
    )  # the attention's synthetic gradient, into it and below it
    grads = dict(zip([f"1.mha.{n}" for n, _ in ref[1].mha.named_parameters()], g2[:-1], strict=True))
    grads |= dict(
        zip(["0.weight", "0.bias"], torch.autograd.grad(h1, list(ref[0].parameters()), s1), strict=True)
    )
    top = h2.detach().requires_grad_()
    (target2,) = torch.autograd.grad(F.cross_entropy(ref[3](ref[2](top)), y), top)
    _check(
        dni,
        grads,
        {
            "1/mha": _synth_grads(synth["1/mha"], [h2.detach()], [target2]),
            "0": _synth_grads(synth["0"], [h1.detach()], [g2[-1]]),
        },
        before,
    )


def test_recursive_warns_about_parameters_that_containers_hold():
    """A learned positional embedding beside the layers, in the model or in a container (torchvision's ViT
    ``Encoder``): no wrapped module holds it, so the wrapper does not step it; said at construction. The layers
    around it are wrapped one by one (wrapping the container whole would train them by plain backprop)."""

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(5, 8))
            self.layers = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x + self.pos)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.proj = nn.Linear(4, 8)
            self.encoder = Encoder()
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.proj(x) * self.scale).mean(1))

    with pytest.warns(
        UserWarning, match=r"the parameters \['scale', 'encoder.pos'\] belong to containers"
    ) as record:
        dni = DNI(Model(), hidden_size=4)
    # the user's line, not the wrapper's
    assert [w.filename for w in record if "belong to containers" in str(w.message)] == [__file__]
    assert list(dni.wrapped_modules()) == ["proj", "encoder.layers.0", "encoder.layers.2"]


def test_recursive_wraps_a_parametrized_layer_and_a_bare_attention_whole():
    """A ``weight_norm`` layer keeps its parameters in ``.parametrizations``: it is one leaf, not its
    parametrization list (whose "output" is the weight). An attention module given alone is wrapped whole; its
    width is known at construction (``embed_dim``), so its synthesizer exists at once."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 8, bias=False)), nn.ReLU(), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dni = DNI(net, hidden_size=4, diagnostics=True)
    assert list(dni.wrapped_modules()) == ["0"]
    F.cross_entropy(dni(torch.randn(5, 4)), torch.randint(0, 3, (5,))).backward()
    assert dni.interfaces["0"].last_target.shape == (5, 8)  # the layer's output, not its weight
    attention = DNI(nn.MultiheadAttention(8, 2), skip_last_layer=False, grad_optim=None)
    assert list(attention.wrapped_modules()) == [""]
    assert attention.interfaces["root"].synthesizer.final.out_features == 8  # built at construction


def test_a_wrapped_module_that_no_forward_calls_is_reported_once():
    """``out_proj`` of an attention is read, never called: an interface on it would train nothing. The first
    training forward says so, naming it; later forwards stay quiet."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), _Attend(), nn.Flatten(), nn.Linear(5 * 8, 3))
    dni = DNI(net, hidden_size=4, modules=["0", "1.mha.out_proj"], inject="deferred")
    x = torch.randn(3, 5, 4)
    dni.eval()
    dni(x)  # eval mode: no training, no report
    dni.train()
    with pytest.warns(
        UserWarning, match=r"the wrapped modules \['1.mha.out_proj'\] were not called"
    ) as record:
        dni(x)
    # the user's call, not nn.Module.__call__ or torch.compiler.disable's wrapper around DNI.forward
    (warning,) = (w for w in record if "were not called" in str(w.message))
    assert warning.filename == __file__
    assert linecache.getline(__file__, warning.lineno).strip() == "dni(x)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dni(x)
