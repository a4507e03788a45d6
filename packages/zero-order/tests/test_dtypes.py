"""float32, float64, bfloat16 parameters; noise on the parameter's device; CUDA when available."""

import pytest
import torch
import torch.nn.functional as F

import altgrad.zero_order as zo
from altgrad.zero_order import estimate_gradient, zero_order

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(
    "make_dist",
    [
        lambda: torch.distributions.Normal(0.0, 1.0),
        lambda: zo.SeededNormal(0),
        lambda: zo.NoiseTable(0, 1 << 16),
    ],
    ids=["torch-normal", "seeded", "table"],
)
def test_linear_model_any_dtype(device, dtype, make_dist):
    # TorchOpt fails here for bf16 ("mat1 and mat2 must have the same dtype") and for CUDA parameters.
    lin = torch.nn.Linear(8, 1).to(device=device, dtype=dtype)
    x = torch.randn(32, 8, device=device, dtype=dtype)
    y = torch.randn(32, 1, device=device, dtype=dtype)
    params = tuple(p.detach().requires_grad_() for p in lin.parameters())

    @zero_order(make_dist(), method="antithetic", num_samples=400, sigma=0.05)
    def f(params, x, y):
        # F.mse_loss written out: torch < 2.6 has no bfloat16 mse_loss on CPU ("mse_cpu" not implemented).
        d = F.linear(x, *params) - y
        return (d * d).mean()

    grads = torch.autograd.grad(f(params, x, y), params)
    true = torch.autograd.grad(
        F.mse_loss(F.linear(x.double(), *(p.double() for p in params)), y.double()), params
    )
    for g, t, p in zip(grads, true, params):
        assert g.dtype == p.dtype
        assert g.device == p.device
        cos = F.cosine_similarity(g.double().flatten(), t.double().flatten(), dim=0)
        # Statistical bound: antithetic on a near-linear f has noise ‖ĝ − g‖² ≈ (D + 1)‖g‖²/N = 10/400 of ‖g‖²
        # (cos ≈ 0.988); cos ≤ 0.8 needs a noise norm 4.7× its expectation (χ² with ≥ 1 dof: p < 1e-6), and the
        # bf16 rounding of the result (2^-8 relative) and of x, y moves cos by < 0.01.
        assert cos > 0.8, cos


def test_bf16_noise_is_drawn_in_float32():
    seen = []

    def dist(shape):
        z = torch.randn(shape)
        seen.append(z.dtype)
        return z

    p = torch.zeros(4, dtype=torch.bfloat16)
    (g,) = estimate_gradient(lambda t: t.float().sum(), [p], dist, "antithetic", 8, 0.1)
    assert g.dtype == torch.bfloat16
    assert seen == [torch.float32]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_distribution_with_cuda_params():
    dist = lambda shape: torch.randn(shape)  # noqa: E731 - samples on CPU like TorchOpt's documented default
    p = torch.zeros(5, device="cuda")
    (g,) = estimate_gradient(lambda t: t.sum(), [p], dist, "antithetic", 16, 0.1)
    assert g.device.type == "cuda"
    # Antithetic, linear f with gradient 1: Var[g_i] = (5 + 1)/16; 5 standard deviations.
    torch.testing.assert_close(g, torch.ones(5, device="cuda"), atol=5 * (6 / 16) ** 0.5, rtol=0)


@pytest.mark.parametrize(("loc", "scale"), [(0.0, 1.0), (0.5, 2.0)])
def test_scalar_normal_fast_path_is_bit_identical_to_normal_sample(loc, scale):
    # A scalar torch.distributions.Normal is drawn with one torch.randn on the parameter's device: the same
    # generator stream, the same values as Normal.sample (bit for bit, so results do not depend on the path).
    from altgrad.zero_order._noise import NoiseSource

    dist = torch.distributions.Normal(loc, scale)
    torch.manual_seed(3)
    want = dist.sample((6, 5, 4))
    torch.manual_seed(3)
    got = NoiseSource(dist).draw(0, (5, 4), torch.device("cpu"), torch.float32, range(6), 0)
    # exact: by construction: the same generator stream, then the same ·scale and +loc ops
    assert torch.equal(got, want)
