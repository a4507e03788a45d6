"""NESgpu's code-level API, exercised the way its own scripts call it (issue 14).

The calls below follow ``moduletests.py`` (``get_linear_layers``, ``get_conv_layers``, ``test_layers``,
``test_perm``, ``test_perm_conv``, ``test_combined``), ``mnisttest.py`` / ``cifar10test.py`` (``Trainer.train``) and
``models/mnistmodels.py`` / ``models/cifar10models.py`` (``sequence_builder``, ``MNISTConvNet``, ``ResNet9``) of
jamesal1/NESgpu at 66c5ebc, with ``from modules import base`` replaced by ``import altgrad.es_layers as base``,
CPU instead of CUDA and small synthetic data instead of MNIST/CIFAR-10. No NESgpu code is copied: these are our
own tests of each name and signature those scripts use.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import altgrad.es_layers as base  # the scripts' `from modules import base`, changed

DEVICE = "cpu"
# float64 layers against the float64 per-member loop: both sum < 100 products per output, a few ulps apart.
TOL = {"rtol": 1e-9, "atol": 1e-9}


def get_linear_layers(input_dim, output_dim, batch_size, device="cpu", type=torch.float32):
    """The layer list of moduletests.py, every constructor call with the script's arguments."""
    return [
        (base.PerturbedLinear(input_dim, output_dim, batch_size).to(device).type(type), "IID"),
        (base.PerturbedLinear(input_dim, output_dim, batch_size // 2).to(device).type(type), "Antithetic"),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="out").to(device).type(type),
            "plo",
        ),
        (
            base.PermutedLinear(
                input_dim, output_dim, batch_size, permutation="out", options={"combined": True}
            )
            .to(device)
            .type(type),
            "plof",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="in").to(device).type(type),
            "pli",
        ),
        (
            base.PermutedLinear(
                input_dim,
                output_dim,
                batch_size,
                permutation="in",
                options={"combined": True, "allow_repeats": True},
            )
            .to(device)
            .type(type),
            "plif",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size // 2, permutation="out")
            .to(device)
            .type(type),
            "plo2",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size // 2, permutation="in")
            .to(device)
            .type(type),
            "pli2",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="both").to(device).type(type),
            "plb",
        ),
        (base.SyntheticLinear(input_dim, output_dim, batch_size, flip="out").to(device).type(type), "nlo"),
        (base.SyntheticLinear(input_dim, output_dim, batch_size, flip="in").to(device).type(type), "nli"),
        (
            base.SyntheticLinear(input_dim, output_dim, batch_size // 2, flip="in").to(device).type(type),
            "nli2",
        ),
        (base.SyntheticLinear(input_dim, output_dim, batch_size, flip="both").to(device).type(type), "nlb"),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="out", out_sparsity=0.99)
            .to(device)
            .type(type),
            "splo",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="in", in_sparsity=0.5)
            .to(device)
            .type(type),
            "s2pli",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="in", in_sparsity=0.1)
            .to(device)
            .type(type),
            "s10pli",
        ),
        (
            base.PermutedLinear(
                input_dim,
                output_dim,
                batch_size,
                permutation="in",
                in_sparsity=0.1,
                options={"combined": True, "allow_repeats": True},
            )
            .to(device)
            .type(type),
            "s10plif",
        ),
        (
            base.PermutedLinear(input_dim, output_dim, batch_size, permutation="out", out_sparsity=0.1)
            .to(device)
            .type(type),
            "s10plo",
        ),
        (
            base.PermutedLinear(
                input_dim,
                output_dim,
                batch_size,
                bias=False,
                permutation="out",
                out_sparsity=0.1,
                options={"combined": True},
            )
            .to(device)
            .type(type),
            "s10plof",
        ),
        (
            base.PermutedLinear(
                input_dim, output_dim, batch_size, permutation="both", in_sparsity=0.1, out_sparsity=0.1
            )
            .to(device)
            .type(type),
            "s10plb",
        ),
    ]


def get_conv_layers(input_dim, output_dim, filter_size, batch_size, device="cpu", type=torch.float32):
    """The layer list of moduletests.py's get_conv_layers (padding = 1), with the script's arguments."""
    padding = 1
    c = (input_dim, output_dim, filter_size, batch_size)
    perm_opts = {"combined": True, "allow_repeats": True}
    return [
        (base.PerturbedConv2d(*c, padding=padding, options={"direct": True}).to(device).type(type), "IID"),
        (
            base.PerturbedConv2d(input_dim, output_dim, filter_size, batch_size // 2, padding=padding)
            .to(device)
            .type(type),
            "Antithetic",
        ),
        (base.PermutedConv2d(*c, padding=padding, permutation="out").to(device).type(type), "plo"),
        (base.PermutedConv2d(*c, padding=padding, permutation="in").to(device).type(type), "pli"),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="in", options=perm_opts)
            .to(device)
            .type(type),
            "plif",
        ),
        (base.PermutedConv2d(*c, padding=padding, permutation="both").to(device).type(type), "plb"),
        (base.SyntheticConv2d(*c, padding=padding, flip="in").to(device).type(type), "nli"),
        (base.SyntheticConv2d(*c, padding=padding, flip="out").to(device).type(type), "nlo"),
        (base.SyntheticConv2d(*c, padding=padding, flip="both").to(device).type(type), "nlb"),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="in", in_sparsity=0.5).to(device).type(type),
            "s2pli",
        ),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="in", in_sparsity=0.1).to(device).type(type),
            "s10pli",
        ),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="in", in_sparsity=0.5, options=perm_opts)
            .to(device)
            .type(type),
            "s2plif",
        ),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="out", out_sparsity=0.5)
            .to(device)
            .type(type),
            "s2plo",
        ),
        (
            base.PermutedConv2d(*c, padding=padding, permutation="both", out_sparsity=0.9, in_sparsity=1.0)
            .to(device)
            .type(type),
            "splb",
        ),
    ]


def _run_like_test_layers(layers, make_input, batch_size, reference):
    """moduletests.test_layers: allocate, scale, seed, noise, then forward / update / set_noise by name."""
    for layer, name in layers:
        layer.allocate_memory()
        layer.set_noise_scale(1.0)
        layer.set_seed()
        layer.set_noise()
        layer.perturbed_flag = True
        inp = make_input(layer)
        with torch.no_grad():
            out = getattr(layer, "forward")(inp)  # noqa: B009  (the script looks the method up by name)
        torch.testing.assert_close(out, reference(layer, inp), **TOL, msg=name)
        w = torch.rand(layer.directions, dtype=torch.float64)
        getattr(layer, "update")(w)  # noqa: B009
        dense_w, _ = layer.dense_noise()
        torch.testing.assert_close(
            layer.weight.grad, torch.einsum("k,k...->...", w, dense_w), **TOL, msg=name
        )
        getattr(layer, "set_noise")(1)  # noqa: B009  (func="set_noise" is called with inp = 1)
        assert layer.noise_scale == 1
        layer.free_memory()
        assert layer.noise_memory_bytes == 0
    layer.perturbed_flag = False
    with torch.no_grad():
        base_out = layer.forward(inp)  # "Base"
        naive = layer.forward(inp[:1])  # "Naive": one row at a time
    torch.testing.assert_close(naive, base_out[:1])
    assert base_out.shape[0] == batch_size


def test_moduletests_linear_layers(reference):
    batch_size, in_dim, out_dim = 40, 20, 12
    layers = get_linear_layers(in_dim, out_dim, batch_size, DEVICE, torch.float64)
    g = torch.Generator().manual_seed(0)
    _run_like_test_layers(
        layers,
        lambda layer: torch.rand(batch_size, in_dim, generator=g, dtype=torch.float64),
        batch_size,
        reference,
    )


def test_moduletests_conv_layers(reference):
    batch_size, in_dim, out_dim, image = 8, 10, 6, (5, 4)
    layers = get_conv_layers(in_dim, out_dim, (3, 3), batch_size, DEVICE, torch.float64)
    g = torch.Generator().manual_seed(1)
    _run_like_test_layers(
        layers,
        lambda layer: torch.rand(batch_size, in_dim, *image, generator=g, dtype=torch.float64),
        batch_size,
        reference,
    )


def test_moduletests_half_precision_layers_run():
    # test_layers(type=torch.float16): `.to(device).type(torch.float16)` converts the layer and its noise
    layers = get_linear_layers(16, 8, 8, DEVICE, torch.float16)
    for layer, name in layers:
        layer.set_noise(0.1)
        layer.perturbed_flag = True
        with torch.no_grad():
            out = layer(torch.rand(8, 16, dtype=torch.float16))
        assert out.dtype == torch.float16, name
        assert torch.isfinite(out).all(), name
        layer.update(torch.rand(layer.directions, dtype=torch.float16))
        assert layer.weight.grad.dtype == torch.float16


def test_moduletests_test_perm_and_test_perm_conv():
    d = 8
    lin = base.PermutedLinear(16, 16, d, permutation="out").to(DEVICE)
    for _ in range(3):  # test_perm
        lin.allocate_memory()
        lin.set_noise_scale(1.0)
        lin.set_seed()
        lin.set_noise()
        lin.update(torch.rand(d))
    assert lin.weight.grad.shape == lin.weight.shape
    inp = torch.empty((d, 5, 8, 8), device=DEVICE).normal_()
    conv = base.PermutedConv2d(5, 5, (3, 3), d, permutation="both").to(DEVICE)
    for _ in range(2):  # test_perm_conv, first loop
        conv.set_noise(1.0)
        conv.perturbed_flag = True
        with torch.no_grad():
            conv.forward(inp)
        conv.update(torch.rand(d))
    for _ in range(2):  # second loop: perturbed_flag off gives the plain convolution
        conv.allocate_memory()
        conv.set_noise_scale(1.0)
        conv.set_seed()
        conv.set_noise()
        conv.perturbed_flag = False
        with torch.no_grad():
            torch.testing.assert_close(conv.forward(inp), nn.Conv2d.forward(conv, inp))


def test_moduletests_test_combined():
    # "combined" is a speed option in NESgpu: the script checks both paths agree; here they are one path
    layer = base.PermutedConv2d(
        8, 8, (3, 3), 16, permutation="in", in_sparsity=0.1, options={"combined": True}
    )
    layer.set_noise(1e-5)
    layer.perturbed_flag = True
    inp = torch.rand(16, 8, 6, 6)
    with torch.no_grad():
        a = layer.forward(inp)
        layer.options = {}
        b = layer.forward(inp)
    assert torch.equal(a, b)  # exact: same route ("combined" is one path here)


# ----------------------------------------------------------------------------- mnisttest / cifar10test training
class Residual(nn.Module):
    def __init__(self, layers):
        nn.Module.__init__(self)
        self.layers = layers

    def forward(self, input):
        return input + self.layers.forward(input)


def sequence_builder(li, in_channels, kernel_size, directions, padding, in_sparsity, options, batch_norm):
    """models/*.py's sequence_builder: PermutedConv2d(..., padding=, in_sparsity=, options=) blocks."""
    layers = []
    for out_channels in li:
        if isinstance(out_channels, list):
            seq, in_channels = sequence_builder(
                out_channels, in_channels, kernel_size, directions, padding, in_sparsity, options, batch_norm
            )
            layers += [Residual(seq)]
        elif out_channels == "M":
            layers += [nn.MaxPool2d(2)]
        else:
            layers += [
                base.PermutedConv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    directions,
                    padding=padding,
                    in_sparsity=in_sparsity,
                    options=options,
                )
            ]
            if batch_norm:
                layers += [nn.BatchNorm2d(out_channels, affine=False)]
                layers += [base.PerturbedAffine((out_channels, 1, 1), directions)]
            layers += [nn.ELU(inplace=True)]
            in_channels = out_channels
    return nn.Sequential(*layers), in_channels


class SmallConvNet(nn.Module):
    """MNISTConvNet / ResNet9 in miniature: the same layer types, options and wiring on 8x8 inputs."""

    def __init__(self, directions, action_size, in_channels=1, batch_norm=False, residual=False, width=8):
        super().__init__()
        options = {"combined": True, "allow_repeats": True}
        config = [width, "M", [width, width], "M"] if residual else [width, "M", width, "M"]
        seq, in_channels = sequence_builder(
            config, in_channels, 3, directions, 1, 1 / 16, options, batch_norm
        )
        self.layers = nn.Sequential(
            seq,
            nn.Flatten(),
            base.SyntheticLinear(in_channels * 4, 4 * width, directions),
            base.SyntheticLinear(4 * width, action_size, directions),
        )

    def forward(self, input):
        return self.layers.forward(input).squeeze()


def _digits(n, generator):
    """4 classes of 8x8 one-channel images: a bright quadrant (the class) plus noise."""
    labels = torch.randint(4, (n,), generator=generator)
    images = 0.3 * torch.randn(n, 1, 8, 8, generator=generator)
    for c in range(4):
        r, q = divmod(c, 2)
        images[labels == c, 0, 4 * r : 4 * r + 4, 4 * q : 4 * q + 4] += 1.0
    return images, labels


def _train_like_trainer(model, directions, steps, lr, noise_scale, seed):
    """Trainer.train of mnisttest.py / cifar10test.py (batch_size = directions, SGD + weight decay)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = _digits(4096, g)
    test_x, test_y = _digits(512, g)
    model.batch_size = directions
    perturbed_model = base.PerturbedModel(model, directions)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=2e-4, momentum=0)
    lr_scale = 1.0

    def test_loss():
        with torch.no_grad():
            model.eval()
            loss = nn.CrossEntropyLoss()(model(test_x), test_y).item()
            model.train()
            return loss

    start = test_loss()
    for _ in range(steps):
        idx = torch.randint(images.shape[0], (directions,), generator=g)
        data, target = images[idx], labels[idx]
        with torch.no_grad():
            perturbed_model.set_seed()
            perturbed_model.set_noise_scale(noise_scale)
            perturbed_model.allocate_memory()
            perturbed_model.set_noise()
            pred = perturbed_model.forward(data)
            reward = nn.CrossEntropyLoss(reduction="none")(pred, target)
            result = reward - reward.mean()
            step_size = result * lr_scale / noise_scale
            perturbed_model.update(step_size)
        opt.step()
        opt.zero_grad()
    return start, test_loss()


@pytest.fixture
def reproducible_set_seed(monkeypatch):
    """The scripts call set_seed() without a seed (a fresh one from the OS here): draw it from a seeded RNG."""
    import random
    import secrets

    monkeypatch.setattr(secrets, "randbits", random.Random(2).getrandbits)  # mnisttest.py: random.seed(2)


def test_mnisttest_training_loop_learns(reproducible_set_seed):
    torch.manual_seed(0)
    directions = 512
    model = SmallConvNet(directions, action_size=4, width=4)
    assert isinstance(model.layers[0][0], base.PermutedConv2d)
    start, end = _train_like_trainer(model, directions, steps=30, lr=6e-3, noise_scale=0.05, seed=0)
    # lr chosen on torch seeds 0-2 at both CPU kernel levels (fixed set_seed source): end/start 0.014-0.02;
    # with OS seeds (as the script) 4 seeds x 2 levels gave 0.01-0.65, hence the reproducible seed source
    assert end < 0.5 * start, (start, end)


def test_cifar10test_residual_batchnorm_affine_model_trains(reproducible_set_seed):
    torch.manual_seed(1)
    directions = 128
    model = SmallConvNet(directions, action_size=4, batch_norm=True, residual=True, width=4)
    affine = [m for m in model.modules() if isinstance(m, base.PerturbedAffine)]
    assert len(affine) == 3
    start, end = _train_like_trainer(model, directions, steps=8, lr=6e-3, noise_scale=0.05, seed=1)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(  # exact: any change counts
        affine[0].weight.detach(), torch.ones_like(affine[0].weight)
    )  # the affine layers train
    # 8 steps of 128 members: torch seeds 0-2 gave end/start 0.82-0.94 at both kernel levels
    assert end < 0.97 * start, (start, end)


# ----------------------------------------------------------------------------- differences stated in the docs
def test_options_and_synthetic_sparsity_errors():
    with pytest.raises(ValueError, match="unknown key"):
        base.PermutedLinear(4, 4, 2, options={"fast": True})
    with pytest.raises(TypeError, match="options must be a dict"):
        base.PerturbedLinear(4, 4, 2, options=["direct"])
    with pytest.raises(ValueError, match="in_sparsity must be 0"):
        base.SyntheticLinear(4, 4, 2, in_sparsity=0.5)
    with pytest.raises(ValueError, match="out_sparsity must be 0"):
        base.SyntheticConv2d(4, 4, 3, 2, out_sparsity=2)
    layer = base.PerturbedAffine((3, 1, 1), 2)  # NESgpu's default options={"direct": True} works too
    assert layer.options == {}
    assert base.PerturbedAffine(3, 2, options={"direct": True}).options == {"direct": True}


def test_positional_arguments_follow_nesgpu():
    # NESgpu: PerturbedConv2d(in, out, kernel, directions, stride, padding, dilation, groups, bias, antithetic,
    # options, padding_mode); PermutedLinear(in, out, directions, bias, antithetic, options, permutation, ...)
    conv = base.PerturbedConv2d(4, 6, 3, 2, 1, 1, 1, 2, False, False, {"direct": True}, "circular")
    assert (conv.stride, conv.padding, conv.groups, conv.bias, conv.antithetic) == (
        (1, 1),
        (1, 1),
        2,
        None,
        False,
    )
    assert conv.padding_mode == "circular"
    assert conv.options == {"direct": True}
    lin = base.PermutedLinear(8, 4, 2, True, False, {"combined": True}, "in", 0.5, 0)
    assert (lin.permutation, lin.in_sparsity, lin.antithetic) == ("in", 4, False)
    syn = base.SyntheticConv2d(4, 6, 3, 2, 1, 0, 1, 1, True, True, {}, "zeros", "out", 0, 0)
    assert syn.flip == "out"


def test_perturb_passes_options_through():
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Conv2d(1, 2, 1))
    pm = base.perturb(net, 4, mode="permuted", options={"combined": True, "allow_repeats": True}, seed=0)
    assert net[0].options == {"combined": True, "allow_repeats": True}
    assert net[2].options == net[0].options
    pm.allocate_memory()  # the script's call on the model wrapper
    with pytest.raises(ValueError, match="unknown key"):
        base.perturb(nn.Sequential(nn.Linear(2, 2)), 4, options={"fused": True})
