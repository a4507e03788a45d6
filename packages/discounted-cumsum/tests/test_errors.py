"""Bad input gets a clear exception that names the argument."""

from __future__ import annotations

import pytest
import torch

from altgrad.discounted_cumsum import (
    _native,
    discounted_cumsum,
    discounted_cumsum_right,
    discounted_returns,
    generalized_advantage_estimate,
)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_x(dtype):
    with pytest.raises(TypeError, match="`x`"):
        discounted_cumsum(torch.zeros(2, 3, dtype=dtype), 0.5)


def test_x_not_a_tensor():
    with pytest.raises(TypeError, match="`x`"):
        discounted_cumsum([1.0, 2.0], 0.5)


@pytest.mark.parametrize("dim", [2, -3, 10])
def test_dim_out_of_range(dim):
    with pytest.raises(IndexError, match="`dim`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, dim=dim)


def test_dim_not_int():
    with pytest.raises(TypeError, match="`dim`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, dim=1.0)


@pytest.mark.parametrize("shape", [(4,), (2, 4), (3, 3, 1)])
def test_gamma_does_not_broadcast(shape):
    with pytest.raises(ValueError, match="`gamma`"):
        discounted_cumsum(torch.zeros(2, 3), torch.ones(shape))


@pytest.mark.parametrize(
    "gamma", [torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.bool), "0.9", None]
)
def test_gamma_bad_type(gamma):
    with pytest.raises(TypeError, match="`gamma`"):
        discounted_cumsum(torch.zeros(2, 3), gamma)


def test_peer_gamma_wrong_length():
    with pytest.raises(ValueError, match="`gamma`"):
        discounted_cumsum_right(torch.zeros(2, 3), torch.ones(3))


def test_peer_api_wants_2d():
    with pytest.raises(ValueError, match="`x`"):
        discounted_cumsum_right(torch.zeros(2, 3, 4), 0.5)


def test_dones_wrong_shape():
    with pytest.raises(ValueError, match="`dones`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, dones=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="`dones`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, dones=[True, False])


def test_initial_wrong_shape():
    with pytest.raises(ValueError, match="`initial`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, initial=torch.zeros(3))
    with pytest.raises(TypeError, match="`initial`"):
        discounted_cumsum(torch.zeros(2, 3), 0.5, initial="1")


def test_device_mismatch():
    x = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="`gamma`"):
        discounted_cumsum(x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="`dones`"):
        discounted_cumsum(x, 0.5, dones=torch.zeros(2, 3, dtype=torch.bool))


def test_zero_dim_cpu_gamma_is_accepted_anywhere():
    y = discounted_cumsum(torch.zeros(2, 3, device="meta"), torch.tensor(0.5))
    assert y.device.type == "meta"


def test_missing_cuda_module_error_is_clear():
    with pytest.raises(RuntimeError, match=r"native cuda module is not available.*ALTGRAD_CUDA=1"):
        _native._require(None, "ImportError: no module", "cuda")


@pytest.mark.skipif(torch.cuda.is_available() and _native.cuda_available(), reason="CUDA module present")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to create a CUDA tensor")
def test_cuda_tensor_without_cuda_module():
    with pytest.raises(RuntimeError, match="cuda module"):
        discounted_cumsum(torch.zeros(2, 3, device="cuda"), 0.5)


def test_rl_helpers_check_shapes():
    with pytest.raises(ValueError, match="`values`"):
        generalized_advantage_estimate(torch.zeros(4, 3), torch.zeros(4), 0.99, 0.95)
    with pytest.raises(ValueError, match="`dones`"):
        discounted_returns(torch.zeros(4, 3), 0.99, dones=torch.zeros(2, dtype=torch.bool))
