"""The ``altgrad_discounted_cumsum::scan`` custom op: device dispatch, fake kernel and autograd formula.

Gradients (scan order s = 0..N-1, gates a_s = gamma_s (1 - d_s), y_{-1} = initial, incoming gradient g):

* lambda_s = g_s + a_{s+1} lambda_{s+1}: the same scan in the opposite direction with the gates moved one step,
* dL/dx_s = lambda_s,
* dL/dgamma_s = lambda_s y_{s-1} (0 where d_s), summed over the broadcast dimensions of gamma (in a fixed order,
  ``_sum_to_size``, so that the result does not depend on the thread count),
* dL/dinitial = a_0 lambda_0 (0 where a_0 = 0).

Zero gates cut the recurrence in both directions, so masks are applied with ``where``, never by multiplying
with 0 (which would turn a NaN or inf from another episode into NaN).
"""

import math
from typing import Optional

import torch

from ._args import compute_dtype
from ._native import native_scan
from .reference import scan_reference

_NATIVE_DEVICES = ("cpu", "cuda")


def scan_eager(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    gamma_value: float,
    dones: torch.Tensor | None,
    initial: torch.Tensor | None,
    dim: int,
    reverse: bool,
) -> torch.Tensor:
    """The body of the op: native kernel on CPU/CUDA, the pure-torch loop elsewhere."""
    if x.device.type in _NATIVE_DEVICES:
        return native_scan(x, gamma, gamma_value, dones, initial, dim, reverse)
    return scan_reference(x, gamma, gamma_value, dones, initial, dim, reverse).contiguous()


_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_function_mode_enabled = getattr(torch._C, "_is_torch_function_mode_enabled", None)


def _modes_active() -> bool:
    """Whether a dispatch mode, torch-function mode or functorch transform is active (True if unknown)."""
    checks = (_dispatch_stack_len, _functorch_active, _function_mode_enabled)
    if any(f is None for f in checks):
        return True
    return any(f() for f in checks if f is not None)


def can_skip_dispatcher(
    x: torch.Tensor,
    gamma: Optional[torch.Tensor],  # noqa: UP045
    dones: Optional[torch.Tensor],  # noqa: UP045
    initial: Optional[torch.Tensor],  # noqa: UP045
) -> bool:
    """True when calling ``scan_eager`` directly is indistinguishable from calling the op.

    That is the case in plain eager mode: not compiling or tracing, no autograd needed, plain CPU/CUDA tensors, and
    no torch-function/dispatch mode or functorch transform active. Skipping the dispatcher saves tens of
    microseconds per call, which dominates small RL-sized inputs.
    """
    if torch.compiler.is_compiling():  # first: dynamo must not trace the private checks below
        return False
    if type(x) is not torch.Tensor or x.device.type not in _NATIVE_DEVICES:
        return False
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return False
    for t in (gamma, dones, initial):
        if t is not None and (type(t) is not torch.Tensor or (grad and t.requires_grad)):
            return False
    return not _modes_active()


@torch.library.custom_op("altgrad_discounted_cumsum::scan", mutates_args=())
def scan(
    x: torch.Tensor,
    gamma: Optional[torch.Tensor],  # noqa: UP045 (custom_op reads these annotations at run time)
    gamma_value: float,
    dones: Optional[torch.Tensor],  # noqa: UP045
    initial: Optional[torch.Tensor],  # noqa: UP045
    dim: int,
    reverse: bool,
) -> torch.Tensor:
    """Discounted cumulative sum on normalised arguments (see ``_args.normalize``); returns a new tensor."""
    return scan_eager(x, gamma, gamma_value, dones, initial, dim, reverse)


@scan.register_fake
def _(x, gamma, gamma_value, dones, initial, dim, reverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _shift(t: torch.Tensor, dim: int, reverse: bool, first: torch.Tensor | None) -> torch.Tensor:
    """Moves ``t`` one step along the scan order: out[s] = t[s-1], out[0] = ``first`` (zeros when None)."""
    n = t.shape[dim]
    if first is None:
        first = torch.zeros_like(t.narrow(dim, 0, 1))
    else:
        first = first.to(t.dtype).expand(t.shape[:dim] + t.shape[dim + 1 :]).unsqueeze(dim)
    if reverse:
        return torch.cat([t.narrow(dim, 1, n - 1), first], dim)
    return torch.cat([first, t.narrow(dim, 0, n - 1)], dim)


# Block length of _sum_to_size's fixed summation order.
_SUM_BLOCK = 1024


def _sum_to_size(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t.sum_to_size(shape)`` in an order fixed by the shapes alone.

    ATen splits a long reduction among threads, so ``sum_to_size`` of a long row gives different bits at 1 and 2
    threads. Here every sum runs over at most ``_SUM_BLOCK`` contiguous elements (blocks, then blocks of the
    block sums), and threads only share out whole blocks.
    """
    if t.dim() == 0:
        return t.reshape(shape)
    lead = t.dim() - len(shape)
    reduced = [d for d in range(t.dim()) if d < lead or (shape[d - lead] == 1 and t.shape[d] != 1)]
    kept = [d for d in range(t.dim()) if d not in reduced]
    v = t.permute(*kept, *reduced).reshape(-1, math.prod(t.shape[d] for d in reduced))
    while v.shape[1] > _SUM_BLOCK:
        full = v.shape[1] // _SUM_BLOCK * _SUM_BLOCK
        parts = [v[:, :full].reshape(v.shape[0], -1, _SUM_BLOCK).sum(-1)]
        if full < v.shape[1]:
            parts.append(v[:, full:].sum(-1, keepdim=True))
        v = torch.cat(parts, 1)
    return v.sum(-1).reshape(shape)


def _gates(x: torch.Tensor, gamma, gamma_value: float, dones) -> torch.Tensor:
    cd = compute_dtype(x.dtype)
    a = gamma.to(cd) if gamma is not None else torch.full((), gamma_value, dtype=cd, device=x.device)
    if dones is not None:
        a = torch.where(dones, torch.zeros((), dtype=cd, device=x.device), a)
    return a.expand(x.shape)


def _setup_context(ctx, inputs, output):
    _x, gamma, gamma_value, dones, initial, dim, reverse = inputs
    ctx.gamma_value, ctx.dim, ctx.reverse = gamma_value, dim, reverse
    ctx.gamma_shape = None if gamma is None else gamma.shape
    ctx.initial_shape = None if initial is None else initial.shape
    need_y = gamma is not None and ctx.needs_input_grad[1]
    ctx.save_for_backward(gamma, dones, initial, output if need_y else None)


def _backward(ctx, grad):
    gamma, dones, initial, y = ctx.saved_tensors
    dim, reverse, gv = ctx.dim, ctx.reverse, ctx.gamma_value
    n = grad.shape[dim]
    need_gamma = gamma is not None and ctx.needs_input_grad[1]
    need_initial = initial is not None and ctx.needs_input_grad[4]
    if n == 0:
        zero_g = torch.zeros(ctx.gamma_shape, dtype=gamma.dtype, device=grad.device) if need_gamma else None
        zero_i = (
            torch.zeros(ctx.initial_shape, dtype=initial.dtype, device=grad.device) if need_initial else None
        )
        return grad.clone(), zero_g, None, None, zero_i, None, None
    time_constant = gamma is None or gamma.dim() < grad.dim() - dim or gamma.shape[dim - grad.dim()] == 1
    if dones is None and time_constant:
        # The gate does not change along the scan, so moving it by one step changes nothing.
        lam = scan(grad, gamma, gv, None, None, dim, not reverse)
        gates = None
    else:
        gates = _gates(grad, gamma, gv, dones)
        shifted = _shift(gates, dim, not reverse, None)
        lam = scan(grad, shifted, 0.0, None, None, dim, not reverse)
    grad_gamma = grad_initial = None
    if need_gamma:
        cd = compute_dtype(grad.dtype)
        prev = _shift(y.to(cd), dim, reverse, initial)
        g = lam.to(cd) * prev
        if dones is not None:
            g = torch.where(dones, torch.zeros((), dtype=cd, device=g.device), g)
        grad_gamma = _sum_to_size(g, ctx.gamma_shape).to(gamma.dtype)
    if need_initial:
        first = n - 1 if reverse else 0
        if gates is None:
            gates = _gates(grad, gamma, gv, dones)
        a0 = gates.select(dim, first)
        g0 = torch.where(
            a0 == 0,
            torch.zeros((), dtype=a0.dtype, device=a0.device),
            a0 * lam.select(dim, first).to(a0.dtype),
        )
        g0 = _sum_to_size(g0, ctx.initial_shape)
        grad_initial = g0.to(initial.dtype)
    return lam, grad_gamma, None, None, grad_initial, None, None


scan.register_autograd(_backward, setup_context=_setup_context)
