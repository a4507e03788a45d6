"""The maths of synthetic gradients, in one place.

Notation (Jaderberg et al. 2017): an interface sits on an activation ``h`` with ``B`` rows along the batch
dimension. The synthesizer predicts ``ŝ = M(h, c) ≈ ∂L/∂h``; the gradient that later arrives at ``h`` is the
target ``g`` (the true loss gradient at the top interface, a bootstrapped one below it).

* Synthesizer loss: ``ℓ = ‖ŝ − g‖² / B`` (summed over features, averaged over the batch), so
  ``∂ℓ/∂ŝ = 2 (ŝ − g) / B``.
* Gradient sent into the block below the interface (BP(λ) mixture): ``λ·g + (1 − λ)·scale·ŝ``.
  ``λ = 0`` is pure DNI (update-unlocked), ``λ = 1`` is backprop. ``λ = −1`` (pytorch-dni HEAD's meaning) is
  ``g + scale·ŝ``: the true gradient plus the synthetic one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sg_loss(pred: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """Synthesizer regression loss ``‖pred − target‖² / batch_size``, accumulated in at least float32."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    diff = pred.detach().to(dtype) - target.detach().to(dtype)
    return diff.pow(2).sum() / batch_size


def sg_loss_grad(pred: Tensor, target: Tensor, batch_size: int) -> Tensor:
    """Gradient of :func:`sg_loss` with respect to ``pred``: ``2 (pred − target) / batch_size``."""
    return (pred.detach() - target.detach().to(pred.dtype)) * (2.0 / batch_size)


def synthetic_weight(lam: float) -> float:
    """Weight of the synthetic gradient in :func:`mix_gradient`: ``1 − λ``, or 1 for ``λ = −1``."""
    return 1.0 if lam == -1.0 else 1.0 - lam


def mix_gradient(true_grad: Tensor | None, synthetic: Tensor, lam: float, scale: float) -> Tensor:
    """BP(λ) mixture ``λ·g + (1 − λ)·scale·ŝ`` sent to the block below an interface.

    ``lam == 1`` returns ``true_grad`` itself (bit-identical to backprop); ``lam == 0`` never reads it;
    ``lam == -1`` returns ``g + scale·ŝ`` (pytorch-dni HEAD's "DNI + BP").
    """
    if lam == 1.0:
        if true_grad is None:
            return torch.zeros_like(synthetic)
        return true_grad
    sg = synthetic if scale == 1.0 else synthetic * scale
    if lam == 0.0:
        return sg
    if lam == -1.0:
        return sg if true_grad is None else true_grad + sg
    if true_grad is None:
        return sg * (1.0 - lam)
    return true_grad * lam + sg * (1.0 - lam)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of the angle between two tensors seen as flat vectors (at least float32; 0 if either is zero)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a32, b32 = a.detach().to(dtype).flatten(), b.detach().to(dtype).flatten()
    denom = a32.norm() * b32.norm()
    return torch.where(denom > 0, (a32 @ b32) / denom.clamp_min(torch.finfo(dtype).tiny), 0.0)


def broadcast_context(context: Tensor, like: Tensor, batch_dim: int, feature_dim: int) -> Tensor:
    """Broadcast a ``(B, C)`` context to ``like``'s shape with ``C`` along ``feature_dim``.

    For a ``(B, T, F)`` activation with ``feature_dim=-1`` the result is ``(B, T, C)``; for a ``(B, F, H, W)``
    activation with ``feature_dim=1`` it is ``(B, C, H, W)`` (labels broadcast spatially).
    """
    nd = like.dim()
    bdim, fdim = batch_dim % nd, feature_dim % nd
    ctx = context.to(dtype=like.dtype, device=like.device)
    if nd == 2 and bdim < fdim:  # (B, F): the context is (B, C) already
        return ctx
    if bdim > fdim:
        ctx = ctx.t()
    view = [1] * nd
    view[bdim] = ctx.shape[0] if bdim < fdim else ctx.shape[1]
    view[fdim] = ctx.shape[1] if bdim < fdim else ctx.shape[0]
    target = list(like.shape)
    target[fdim] = view[fdim]
    return ctx.reshape(view).expand(target)
