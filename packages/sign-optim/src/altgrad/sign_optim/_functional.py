"""The AddSign / PowerSign update: the maths in one place.

For every parameter with a gradient ``g`` (after ``maximize`` and coupled weight decay), with
``t`` the parameter's step counter after the increment and ``d = sign_decay(t - 1)``::

    m    <- beta * m + (1 - beta) * g             (lerp; m is updated FIRST)
    s    <- sign(g) * sign(m)                     (sign of the NEW m; sign(0) = 0)
    AddSign:    p <- p - lr * (alpha + d * s) * g
    PowerSign:  p <- p - lr * exp(ln(alpha) * d * s) * g

This is TensorFlow's ``ApplyAddSign`` / ``ApplyPowerSign`` kernel with the decay evaluated before
the step counter is incremented. ``_single_tensor_sign_update`` (a loop over parameters) and
``_multi_tensor_sign_update`` (``torch._foreach_*`` over device/dtype buckets) run the same sequence
of element-wise ops, so they give bit-identical results; ``sign()`` would turn any rounding
difference in ``m`` near zero into a full-size step, so this matters.
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
from torch import Tensor
from torch.optim.optimizer import (
    Optimizer,
    _default_to_fused_or_foreach,
    _disable_dynamo_if_unsupported,
    _get_capturable_supported_devices,
    _get_value,
    _view_as_real,
)

Rule = Literal["add", "power"]
DecayFn = Callable[[Any], Any]

__all__: list[str] = []


def _tensor_mode(capturable: bool) -> bool:
    """Whether hyper-parameters that depend on the step must stay tensors (no host sync, no recompiles)."""
    return capturable or torch.compiler.is_compiling()


def _decay_values(
    sign_decay: DecayFn | None,
    steps: list[Tensor],
    capturable: bool,
    cache: dict[float, float] | None = None,
) -> list[Any] | None:
    """Evaluate the sign decay at ``step - 1`` for each (already incremented) step tensor.

    Eager mode returns Python floats (one call per distinct step value, memoised in ``cache``);
    compiled or capturable mode returns 0-dim tensors computed from the step tensors.
    """
    if sign_decay is None:
        return None
    if _tensor_mode(capturable):
        return [sign_decay(step - 1) for step in steps]
    if cache is None:
        cache = {}
    values = []
    for step in steps:
        key = cast(float, _get_value(step))
        if key not in cache:
            d = sign_decay(int(key) - 1)
            if isinstance(d, Tensor) and d.numel() == 1:
                d = d.item()
            if isinstance(d, bool) or not isinstance(d, numbers.Real):
                raise TypeError(
                    f"sign_internal_decay must return a real number, got {type(d).__name__} at step {int(key) - 1}"
                )
            cache[key] = float(d)
        values.append(cache[key])
    return values


def _in_dtype(x: Any, dtype: torch.dtype) -> Any:
    """A Python-float factor rounded to ``dtype`` (as TF casts its scalars to the variable's dtype).

    ``torch._foreach_mul_`` by a Python scalar rounds the scalar to a half-precision tensor's dtype
    first, while ``Tensor.mul_`` keeps it in float32: a factor that is already representable makes
    the two paths do the same arithmetic. Tensors (compiled / capturable mode) pass through.
    """
    if isinstance(x, Tensor) or dtype == torch.float64:
        return x
    fmt = _STRUCT_FORMATS.get(dtype)
    if fmt is not None:
        try:
            return struct.unpack(fmt, struct.pack(fmt, x))[0]
        except OverflowError:  # beyond the dtype's range: torch rounds to +-inf
            pass
    return torch.tensor(x, dtype=torch.float64).to(dtype).item()


_STRUCT_FORMATS = {torch.float32: "f", torch.float16: "e"}


def _multiplier_(s: Tensor, d: Any, rule: Rule, alpha: float) -> None:
    """Turn ``s = sign(g) * sign(m)`` into the update multiplier, in place (single tensor)."""
    if rule == "add":
        if d is not None:
            s.mul_(_in_dtype(d, s.dtype))
        s.add_(alpha)
    else:
        c = math.log(alpha) if d is None else d * math.log(alpha)
        if isinstance(c, Tensor) or c != 1.0:
            s.mul_(_in_dtype(c, s.dtype))
        s.exp_()


def _foreach_multiplier_(signs: list[Tensor], ds: list[Any] | None, rule: Rule, alpha: float) -> None:
    """Turn each ``s`` into the update multiplier, in place (foreach); the same ops as `_multiplier_`."""
    dtype = signs[0].dtype
    if rule == "add":
        if ds is not None:
            torch._foreach_mul_(signs, [_in_dtype(d, dtype) for d in ds])
        torch._foreach_add_(signs, alpha)
    else:
        logbase = math.log(alpha)
        if ds is None:
            if logbase != 1.0:
                torch._foreach_mul_(signs, _in_dtype(logbase, dtype))
        else:
            cs = [d * logbase for d in ds]
            if any(isinstance(c, Tensor) or c != 1.0 for c in cs):
                # Mirror the single-tensor path: multiplying by exactly 1.0 is skipped there, and is exact here.
                torch._foreach_mul_(signs, [_in_dtype(c, dtype) for c in cs])
        torch._foreach_exp_(signs)


def _decoupled_decay_(param: Tensor, lr: float | Tensor, weight_decay: float) -> None:
    """``param <- param * (1 - lr * weight_decay)``, computed as ``param - (lr * weight_decay) * param``.

    ``add_(param, alpha=...)`` keeps the scalar in the op's compute precision on both paths, where a
    foreach multiply by a Python scalar would round ``1 - lr * weight_decay`` to fp16/bf16 first.
    """
    if isinstance(lr, Tensor):
        param.mul_(1 - lr * weight_decay)
    else:
        param.add_(param, alpha=-lr * weight_decay)


def _sign_step_(
    param: Tensor, grad: Tensor, m: Tensor, d: Any, rule: Rule, alpha: float, lr: float | Tensor
) -> None:
    """``param -= lr * grad * multiplier(sign(m) * sign(grad))`` for one tensor (``d``: the sign decay or None)."""
    # sign(sign(m) * g) == sign(g) * sign(m) exactly, with one temporary instead of two.
    s = torch.sign(m).mul_(grad).sign_()
    _multiplier_(s, d, rule, alpha)
    if isinstance(lr, Tensor):
        param.addcmul_(grad, s.mul_(lr), value=-1)
    else:
        param.addcmul_(grad, s, value=-lr)


def _check_capturable(params: list[Tensor], state_steps: list[Tensor]) -> None:
    supported = _get_capturable_supported_devices()
    for p, step in zip(params, state_steps):
        if not (p.device.type == step.device.type and p.device.type in supported):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )


def _single_tensor_sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    rule: Rule,
    lr: float | Tensor,
    beta: float,
    alpha: float,
    sign_decay: DecayFn | None,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if not torch.compiler.is_compiling() and capturable:
        _check_capturable(params, state_steps)
    if not _tensor_mode(capturable):
        lr = cast(float, _get_value(lr))
    decay_cache: dict[float, float] = {}

    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        exp_avg = exp_avgs[i]
        step_t = state_steps[i]

        step_t += 1

        # Complex parameters are updated as (real, imag) pairs: the views come first, so that the
        # weight decay is the same real arithmetic as on the foreach path.
        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            exp_avg = torch.view_as_real(exp_avg)
            param = torch.view_as_real(param)

        if weight_decay != 0:
            if decoupled_weight_decay:
                _decoupled_decay_(param, lr, weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)

        exp_avg.lerp_(grad, 1 - beta)
        ds = _decay_values(sign_decay, [step_t], capturable, decay_cache)
        _sign_step_(param, grad, exp_avg, None if ds is None else ds[0], rule, alpha, lr)


def _multi_tensor_sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    rule: Rule,
    lr: float | Tensor,
    beta: float,
    alpha: float,
    sign_decay: DecayFn | None,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    has_complex: bool,
) -> None:
    if len(params) == 0:
        return
    if differentiable:
        raise RuntimeError("_foreach ops don't support autograd; use foreach=False with differentiable=True")
    if isinstance(lr, Tensor) and not capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if not torch.compiler.is_compiling() and capturable:
        _check_capturable(params, state_steps)

    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, state_steps])  # type: ignore[list-item]
    for (device_params_, device_grads_, device_exp_avgs_, device_state_steps_), _ in grouped.values():
        device_params = cast(list[Tensor], device_params_)
        device_grads = cast(list[Tensor], device_grads_)
        device_exp_avgs = cast(list[Tensor], device_exp_avgs_)
        device_state_steps = cast(list[Tensor], device_state_steps_)

        if has_complex:
            _view_as_real(device_params, device_grads, device_exp_avgs)

        if not torch.compiler.is_compiling() and device_state_steps[0].is_cpu:
            torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(device_state_steps, 1)
        ds = _decay_values(sign_decay, device_state_steps, capturable)

        for chunk in _chunks(device_params):
            _foreach_update_(
                [device_params[i] for i in chunk],
                [device_grads[i] for i in chunk],
                [device_exp_avgs[i] for i in chunk],
                None if ds is None else [ds[i] for i in chunk],
                rule=rule,
                lr=lr,
                beta=beta,
                alpha=alpha,
                weight_decay=weight_decay,
                decoupled_weight_decay=decoupled_weight_decay,
                maximize=maximize,
            )


#: On the CPU, foreach ops are loops over the tensors anyway, and a whole list of full-size
#: temporaries costs fresh pages (page faults) every step; bounding the temporaries of one call to
#: this many elements keeps them in reused memory. The element-wise results are unchanged.
_CPU_CHUNK_NUMEL = 1 << 20


def _chunks(params: list[Tensor]) -> list[list[int]]:
    """Index lists that split a device/dtype bucket into the calls of the foreach update."""
    if torch.compiler.is_compiling() or not params or not params[0].is_cpu:
        return [list(range(len(params)))]
    chunks: list[list[int]] = [[]]
    numel = 0
    for i, p in enumerate(params):
        if chunks[-1] and numel + p.numel() > _CPU_CHUNK_NUMEL:
            chunks.append([])
            numel = 0
        chunks[-1].append(i)
        numel += p.numel()
    return chunks


def _foreach_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    ds: list[Any] | None,
    *,
    rule: Rule,
    lr: float | Tensor,
    beta: float,
    alpha: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """The foreach form of the single-tensor loop body, on one device/dtype bucket (or chunk of it)."""
    if maximize:
        grads = cast(list[Tensor], torch._foreach_neg(grads))

    if weight_decay != 0:
        if decoupled_weight_decay:
            if isinstance(lr, Tensor):
                torch._foreach_mul_(params, 1 - lr * weight_decay)
            else:
                torch._foreach_add_(params, params, alpha=-lr * weight_decay)
        elif maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = cast(list[Tensor], torch._foreach_add(grads, params, alpha=weight_decay))

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta)
    signs = cast(list[Tensor], torch._foreach_sign(exp_avgs))
    torch._foreach_mul_(signs, grads)
    torch._foreach_sign_(signs)
    _foreach_multiplier_(signs, ds, rule, alpha)
    if isinstance(lr, Tensor):
        torch._foreach_mul_(signs, lr)
        torch._foreach_addcmul_(params, grads, signs, value=-1)
    else:
        torch._foreach_addcmul_(params, grads, signs, value=-lr)


def sparse_sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    *,
    rule: Rule,
    lr: float | Tensor,
    beta: float,
    alpha: float,
    sign_decay: DecayFn | None,
    maximize: bool,
) -> None:
    """AddSign / PowerSign step for sparse COO gradients, with TensorFlow's ``_apply_sparse`` semantics.

    TensorFlow first sums the slices of duplicate indices (``_apply_sparse_duplicate_indices``),
    then computes ``m <- m * beta + grad * (1 - beta)`` with the gradient densified (so the ``m`` of
    every row decays, untouched rows by ``beta``), and moves only the touched rows of the variable
    (``scatter_sub``). Here: ``coalesce()``, the same ``lerp`` as the dense path (untouched rows with
    a zero gradient), and the dense path's element-wise ops on the gathered rows. The result equals
    the dense update on the coalesced gradient, except that untouched rows are never written.
    Memory is O(touched rows) beyond ``m`` itself. foreach and the loop both use this function.
    """
    if not torch.compiler.is_compiling() and not isinstance(lr, Tensor):
        lr = cast(float, _get_value(lr))
    decay_cache: dict[float, float] = {}
    for param, grad, exp_avg, step_t in zip(params, grads, exp_avgs, state_steps):
        step_t += 1
        if torch.is_complex(param):
            # Sum duplicates on the (real, imag) view: complex coalesce() lets a NaN in one part
            # spread to the other, where TensorFlow's segment sum adds the parts separately.
            values = torch.view_as_real(grad._values().resolve_conj().resolve_neg())
            grad = torch.sparse_coo_tensor(
                grad._indices(), values, (*grad.shape, 2), is_coalesced=False, check_invariants=False
            )
            param, exp_avg = torch.view_as_real(param), torch.view_as_real(exp_avg)
        grad = grad.coalesce()  # duplicate indices are summed, as TensorFlow does first
        index = tuple(grad.indices())
        values = grad.values()
        if maximize:
            values = -values
        # m of every row: lerp(m, 0, 1 - beta) where untouched, lerp(m, g, 1 - beta) where touched.
        m_rows = exp_avg[index]
        exp_avg.lerp_(torch.zeros((), dtype=exp_avg.dtype, device=exp_avg.device), 1 - beta)
        m_rows.lerp_(values, 1 - beta)
        exp_avg.index_put_(index, m_rows)
        ds = _decay_values(sign_decay, [step_t], False, decay_cache)
        p_rows = param[index]
        _sign_step_(p_rows, values, m_rows, None if ds is None else ds[0], rule, alpha, lr)
        param.index_put_(index, p_rows)


@_disable_dynamo_if_unsupported(single_tensor_fn=_single_tensor_sign_update)
def sign_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    capturable: bool = False,
    differentiable: bool = False,
    has_complex: bool = False,
    *,
    rule: Rule,
    lr: float | Tensor,
    beta: float,
    alpha: float,
    sign_decay: DecayFn | None,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> None:
    """Functional AddSign / PowerSign step over a list of parameters (see the module docstring).

    ``foreach=None`` picks the multi-tensor path when every parameter is on a device with foreach
    kernels (CUDA, XPU, ...), the single-tensor loop otherwise, like `torch.optim`.
    """
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False
    if not torch.compiler.is_compiling() and not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError("`state_steps` must be a list of 0-dim tensors")

    func = _multi_tensor_sign_update if foreach else _single_tensor_sign_update
    func(
        params,
        grads,
        exp_avgs,
        state_steps,
        rule=rule,
        lr=lr,
        beta=beta,
        alpha=alpha,
        sign_decay=sign_decay,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        maximize=maximize,
        capturable=capturable,
        differentiable=differentiable,
        has_complex=has_complex,
    )
