"""Shipped synthesizers: shapes, zero initialisation, the real sigmoid, resolution preservation."""

import pytest
import torch
from torch import nn

from altgrad.dni import (
    RNNDNI,
    Conv1dDNI,
    Conv2dDNI,
    Conv3dDNI,
    DNINetwork,
    LinearBatchNormDNI,
    LinearDNI,
    LinearSigmoidDNI,
)


@pytest.mark.parametrize("cls", [LinearDNI, LinearBatchNormDNI, LinearSigmoidDNI, RNNDNI])
@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 6)])
def test_linear_family_shapes_and_zero_output(cls, shape):
    synth = cls(input_size=6, hidden_size=8, output_size=6)
    grad, _ = synth(torch.randn(shape), None)
    assert grad.shape == shape
    assert torch.count_nonzero(grad) == 0  # zero-initialised last layer: exactly zero at step 0


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv2d_dni_preserves_resolution_and_starts_at_zero():
    synth = Conv2dDNI(input_size=5, hidden_size=4, output_size=3, kernel_size=4)  # even kernel: still "same"
    grad, _ = synth(torch.randn(2, 5, 7, 9), None)
    assert grad.shape == (2, 3, 7, 9)
    assert torch.count_nonzero(grad) == 0
    assert Conv2dDNI.feature_dim == 1


@pytest.mark.parametrize(
    ("cls", "shape"), [(Conv1dDNI, (2, 5, 11)), (Conv2dDNI, (2, 5, 7, 9)), (Conv3dDNI, (2, 5, 3, 4, 6))]
)
def test_conv_synthesizers_of_every_dimensionality_preserve_resolution(cls, shape):
    synth = cls(input_size=5, hidden_size=4, output_size=3, kernel_size=3)
    grad, _ = synth(torch.randn(shape), None)
    assert grad.shape == (2, 3, *shape[2:])
    assert torch.count_nonzero(grad) == 0  # zero-initialised last convolution
    assert cls.feature_dim == 1
    with pytest.raises(ValueError, match=f"{cls.__name__} expects a"):
        synth(torch.randn(*shape, 2), None)


def test_linear_sigmoid_has_a_real_sigmoid():
    synth = LinearSigmoidDNI(3, 4, 3, num_layers=0, scale=0.5)
    with torch.no_grad():
        synth.final.bias.fill_(100.0)
    grad, _ = synth(torch.zeros(2, 3), None)
    torch.testing.assert_close(grad, torch.full((2, 3), 0.5))  # saturated sigmoid → upper bound
    with torch.no_grad():
        synth.final.bias.fill_(-100.0)
    # exact: σ(-100) < 2⁻²⁵ rounds away in 1·σ − 0.5 (any route)
    assert torch.all(synth(torch.zeros(2, 3), None)[0] == -0.5)


def test_rnndni_carries_state_and_resets_on_batch_change():
    synth = RNNDNI(3, 5, 3, kind="gru")
    _, h = synth(torch.randn(2, 3), None)
    assert h.shape == (1, 2, 5)
    _, h2 = synth(torch.randn(4, 3), h)  # batch changed: fresh state instead of an error
    assert h2.shape == (1, 4, 5)
    with pytest.raises(ValueError, match="kind"):
        RNNDNI(3, 5, 3, kind="transformer")


def test_bad_sizes_raise():
    with pytest.raises(TypeError, match="hidden_size"):
        LinearDNI(3, 2.5, 3)
    with pytest.raises(ValueError, match="output_size"):
        LinearDNI(3, 4, 0)
    with pytest.raises(ValueError, match="Conv2dDNI expects"):
        Conv2dDNI(3, 4, 3)(torch.randn(2, 3), None)


def test_dninetwork_is_abstract():
    class Custom(DNINetwork):
        pass

    with pytest.raises(NotImplementedError):
        Custom(2, 2, 2)(torch.zeros(1, 2), None)
    assert isinstance(LinearDNI(2, 2, 2), nn.Module)
