r"""The estimator formulas, in one place.

Notation: $\theta$ the parameters, $\sigma$ the perturbation scale, $z_k$ the direction of member $k = 1..N$ (zero
mean, unit variance per element), $f^+_k = f(\theta + \sigma z_k)$, $f^-_k = f(\theta - \sigma z_k)$,
$f_0 = f(\theta)$. Every estimator has the form $\hat g = \sum_{k=1}^{N} w_k z_k$, and this module computes the
weights $w_k$ (the caller multiplies them by the incoming gradient, which carries the chain rule). The first
three match TorchOpt's documentation (and its code for `naive` and `antithetic`):

| method | $w_k$ | evaluations |
|---|---|---|
| `naive` | $f^+_k / (\sigma N)$ | N |
| `forward` | $(f^+_k - f_0) / (\sigma N)$ | N (+ $f_0$) |
| `antithetic` | $(f^+_k - f^-_k) / (2 \sigma N)$ | 2N |
| `es` | $(r^+_k - r^-_k) / (2N)$, $r$ = centered ranks of all 2N values | 2N |
| `ars` | $(f^+_k - f^-_k) / (b\, s)$ for the $b$ best pairs, else 0 | 2N |

`es` is OpenAI-ES (Salimans et al. 2017): centered ranks over the 2N values jointly (from
`altgrad.es_layers.centered_ranks`), σ absorbed into the learning rate, exactly as `es_distributed/es.py`. `ars`
is Augmented Random Search V1-t (Mania et al. 2018) for a *loss*: the `b = top_k` directions with the smallest
`min(f⁺, f⁻)` are kept and the weights are divided by the standard deviation `s` of their 2b values (σ absorbed,
as in the reference code). Both are search directions rather than unbiased gradient estimates.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from altgrad.es_layers.shaping import centered_ranks

__all__ = [
    "ANTITHETIC_METHODS",
    "METHODS",
    "TWO_PASS_METHODS",
    "Method",
    "direction_weights",
]

Method = Literal["naive", "forward", "antithetic", "es", "ars"]

METHODS: tuple[str, ...] = ("naive", "forward", "antithetic", "es", "ars")
"""All estimator names accepted by ``method=``."""

ANTITHETIC_METHODS: frozenset[str] = frozenset({"antithetic", "es", "ars"})
"""Methods that evaluate both θ + σz and θ − σz (2N evaluations for N directions)."""
#: Methods whose weights need every fitness value first (noise is regenerated or kept for a second pass).
TWO_PASS_METHODS: frozenset[str] = frozenset({"es", "ars"})


def direction_weights(
    method: str,
    f_plus: Tensor,
    *,
    sigma: float,
    num_directions: int,
    f_minus: Tensor | None = None,
    f0: Tensor | None = None,
    top_k: int | None = None,
) -> Tensor:
    r"""Weights $w_k$ such that $\hat g = \sum_k w_k z_k$ (see the module table).

    For ``naive``, ``forward`` and ``antithetic`` the weights of a chunk depend only on that chunk, so they may be
    computed chunk by chunk; ``es`` and ``ars`` need all values at once.

    Args:
        method: One of `METHODS`.
        f_plus: Values $f(\theta + \sigma z_k)$ of the members at hand, shape ``(n,)``.
        sigma: Perturbation scale.
        num_directions: Total number of directions N of the estimate (the normaliser).
        f_minus: Values $f(\theta - \sigma z_k)$ (antithetic methods), shape ``(n,)``.
        f0: Unperturbed value $f(\theta)$ (``forward``), a scalar tensor.
        top_k: Number of directions kept by ``ars`` (default: all).

    Returns:
        Tensor of shape ``(n,)``.

    Raises:
        ValueError: For an unknown method or a missing ``f_minus``/``f0``.
    """
    if method == "naive":
        return f_plus / (sigma * num_directions)
    if method == "forward":
        if f0 is None:
            raise ValueError("method='forward' needs the unperturbed value `f0`")
        return (f_plus - f0) / (sigma * num_directions)
    if method not in ANTITHETIC_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if f_minus is None:
        raise ValueError(f"method={method!r} needs `f_minus`")
    if method == "antithetic":
        return (f_plus - f_minus) / (2.0 * sigma * num_directions)
    if method == "es":
        ranks = centered_ranks(torch.cat([f_plus, f_minus]))
        n = f_plus.numel()
        return (ranks[:n] - ranks[n:]) / (2.0 * num_directions)
    # ars: keep the b directions whose better side (lower loss) is best, normalise by the std of their values.
    n = f_plus.numel()
    b = n if top_k is None else min(top_k, n)
    keep = torch.minimum(f_plus, f_minus).argsort()[:b]
    kept = torch.cat([f_plus[keep], f_minus[keep]])
    std = kept.std(unbiased=False)
    scale = torch.where(std > 0, std, torch.ones_like(std))
    weights = torch.zeros_like(f_plus)
    weights[keep] = (f_plus[keep] - f_minus[keep]) / (b * scale)
    return weights
