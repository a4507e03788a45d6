"""The general path of `ZeroOrderGradientModule`, written out by hand, for differential tests of its fast paths.

`general_estimate` evaluates the module's own forward with every slot that holds a trainable parameter
(``module._parameters[attr]``, each ``(module object, attribute)`` pair once) replaced by the member's perturbed
tensor, in a plain Python loop over members (`estimate_gradient` with ``batching="loop"``): no ``nn.Linear`` fast
path, no ``functional_call``, no vmap. The same seeded distribution at the same step gives the same directions, so
the two estimates differ only by rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from altgrad.zero_order import ZeroOrderGradientModule, estimate_gradient
from altgrad.zero_order.module import _active


def general_estimate(
    net: ZeroOrderGradientModule, args: tuple, kwargs: dict | None = None, *, distribution=None
) -> tuple[Tensor, ...]:
    """The estimate the module's next backward should give (call before it; the distribution is copied)."""
    options = type(net)._zero_order_options
    kwargs = kwargs or {}
    trainable = [p for p in net.parameters() if p.requires_grad]
    index = {id(p): i for i, p in enumerate(trainable)}
    slots, seen = [], set()
    for m in net.modules():
        for attr, t in m._parameters.items():
            if t is not None and id(t) in index and (id(m), attr) not in seen:
                seen.add((id(m), attr))
                slots.append((m, attr, index[id(t)]))
    original = type(net).forward.__zero_order_original_forward__

    def fn(*leaves: Tensor) -> Tensor:
        saved = [(m, attr, m._parameters[attr]) for m, attr, _ in slots]
        try:
            for m, attr, i in slots:
                m._parameters[attr] = leaves[i]
            with _active(net):
                return original(net, *args, **kwargs)
        finally:
            for m, attr, t in saved:
                m._parameters[attr] = t

    if distribution is None:
        distribution = copy.deepcopy(net.zero_order_distribution())
    params = [p.detach().clone() for p in trainable]
    with torch.no_grad():
        return estimate_gradient(
            fn,
            params,
            distribution,
            options.method,
            options.num_samples,
            options.sigma,
            chunk_size=options.chunk_size,
            batching="loop",
            top_k=options.top_k,
            directions=options.directions,
            rank=options.rank,
        )


def rounding_tolerance(net: ZeroOrderGradientModule, value: Tensor, depth_terms: int = 10_000) -> float:
    """Bound on |fast − general| per gradient element, float64 networks.

    Each member's loss is computed by the two paths with the same operations summed in different orders (batched
    vs per-member GEMMs, x Wᵀ + σ x Eᵀ vs x (W + σE)ᵀ): its error is at most γ_K·S with S the sum of the
    magnitudes of the terms. We take K·S ≤ ``depth_terms``·(1 + |f|) (networks of a few layers with inner dimensions
    ≤ 32 and terms of magnitude ≤ 10), so |Δf_k| ≤ 1e4·u·(1 + |f|) with u = 2^-53. The estimate sums N terms
    Δf_k·z_k/σ, divided by N (naive) or 2N (antithetic): at most 2·zmax·|Δf|/σ, with zmax = 6 for normal draws
    (N·P ≤ 1e6 of them) and 36·√r for a low-rank direction (a sum of r products of two such draws, over √r).
    A wrong perturbation (lost, applied to one use only, to the wrong member) moves the estimate by O(0.1).
    """
    options = type(net)._zero_order_options
    u = torch.finfo(torch.float64).eps / 2
    df = depth_terms * u * (1 + abs(float(value.detach())))
    zmax = 36 * options.rank**0.5 if options.directions == "lowrank" else 6
    return 2 * zmax * df / options.sigma
