r"""Fused RL estimators (GAE, TD($\lambda$), V-trace): argument checks, the C++ kernel and the composed route.

Along time $t = 0..N-1$ (``dim``), with the episode end $e_t$ = ``done[t] or terminated[t] or t == N-1`` and the
bootstrap term $b_t$ = 0 where ``terminated[t]``, else $\gamma_t V'_t$ ($V'$ = ``next_value``, or ``value[t+1]``
and ``bootstrap`` at the last step when no next value is given):

* GAE: $A_t = r_t + b_t - V_t + [\lnot e_t]\,\gamma_t\lambda_t A_{t+1}$; second output $A_t + V_t$.
* TD($\lambda$): $G_t = r_t + b_t$ where $e_t$, else $r_t + (1-\lambda_t) b_t + \gamma_t\lambda_t G_{t+1}$; second
  output $G_t - V_t$.
* V-trace: $\rho_t = e^{\log\pi_t - \log\mu_t}$, $p_t = \min(\rho_t, \bar\rho)$, $c_t = \min(\rho_t, \bar c)$,
  $y_t = p_t (r_t + b_t - V_t) + [\lnot e_t]\,\gamma_t c_t y_{t+1}$, $v_{s,t} = y_t + V_t$; second output
  $p_t (r_t + \gamma_t\,[\lnot \mathrm{terminated}_t]\, \hat v_{t+1} - V_t)$ with $\hat v_{t+1} = V'_t$ where $e_t$,
  else $v_{s,t+1}$.

A done step that is not terminated is *truncated*: nothing flows back across it, but it bootstraps from its own next
value. Every mask selects (``where``), so a NaN or inf from another episode never leaks through a cut.

Two routes compute the same formulas: the fused kernels (used when no gradient is needed: C++ on the CPU, one pass,
no temporaries, V-trace's importance ratios formed in it; CUDA, one launch, one thread per sequence, for sequences
of at most 4096 steps or at least 16384 sequences) and a composition over the differentiable scan op (every device;
gradients w.r.t. every floating input, the backward being the transposed scan).
"""

from __future__ import annotations

import math
import numbers

import torch

from . import _native
from ._args import compute_dtype
from ._ops import _modes_active
from .core import discounted_cumsum

GAE, TD_LAMBDA, VTRACE = 0, 1, 2
_NAMES = {GAE: "GAE", TD_LAMBDA: "TD(lambda)", VTRACE: "V-trace"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _same_shape(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"`{name}` must be a floating tensor, got {t.dtype}")
    if t.shape != like.shape:
        raise ValueError(
            f"`{name}` must have the shape of `{like_name}` {tuple(like.shape)}, got {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"`{name}` is on {t.device} but `{like_name}` is on {like.device}")
    return t


def _flags(name: str, t, like: torch.Tensor, like_name: str) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.dtype.is_complex:
        kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"`{name}` must be a bool, integer or float tensor or None, got {kind}")
    if t.device != like.device:
        raise ValueError(f"`{name}` is on {t.device} but `{like_name}` is on {like.device}")
    if t.shape != like.shape and (
        t.dim() > like.dim() or any(s not in (1, u) for s, u in zip(reversed(t.shape), reversed(like.shape)))
    ):
        raise ValueError(
            f"`{name}` of shape {tuple(t.shape)} does not broadcast to `{like_name}` of shape {tuple(like.shape)}"
        )
    return t if t.dtype == torch.bool else t != 0


def _rate(name: str, v, like: torch.Tensor, d: int, like_name: str):
    """A discount-like argument: a float, or a tensor broadcastable to ``like`` (a per-row one gets dim ``d``)."""
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    if not isinstance(v, torch.Tensor) or v.dtype.is_complex or v.dtype == torch.bool:
        kind = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
        raise TypeError(f"`{name}` must be a number or a real tensor, got {kind}")
    if v.device != like.device and v.dim() > 0:
        raise ValueError(f"`{name}` is on {v.device} but `{like_name}` is on {like.device}")
    v = v.to(like.device)
    row_shape = like.shape[:d] + like.shape[d + 1 :]
    if like.dim() > 1 and v.dim() == like.dim() - 1 and v.shape == row_shape:
        return v.unsqueeze(d)
    if v.dim() > like.dim() or any(s not in (1, u) for s, u in zip(reversed(v.shape), reversed(like.shape))):
        raise ValueError(
            f"`{name}` of shape {tuple(v.shape)} does not broadcast to `{like_name}` of shape {tuple(like.shape)} "
            f"and is not per-row (expected {tuple(row_shape)})"
        )
    return v


def _threshold(name: str, v) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.dtype.is_complex and v.dtype != torch.bool:
        v = v.item()
    if not isinstance(v, numbers.Real) or isinstance(v, bool) or math.isnan(float(v)):
        raise ValueError(f"`{name}` must be a number (or a one-element tensor), got {v!r}")
    return float(v)


def estimate(
    mode: int,
    reward: torch.Tensor,
    value: torch.Tensor | None,
    next_value: torch.Tensor | None,
    gamma,
    lam=None,
    done: torch.Tensor | None = None,
    terminated: torch.Tensor | None = None,
    bootstrap=None,
    dim: int = -1,
    log_pi: torch.Tensor | None = None,
    log_mu: torch.Tensor | None = None,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    second: bool = True,
    names: dict[str, str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks the arguments and computes one estimator (see the module docstring); returns both outputs.

    ``names`` renames arguments in error messages (the TorchRL-compatible API calls them ``reward``,
    ``state_value``, ...). The result has the promoted dtype of the value-like inputs and the shape of ``reward``.
    """
    nm = {"reward": "reward", "value": "value", "next_value": "next_value", "gamma": "gamma", "lam": "lam"}
    nm.update(names or {})
    if not isinstance(reward, torch.Tensor) or reward.dtype not in _FLOATS or reward.dim() == 0:
        raise TypeError(f"`{nm['reward']}` must be a floating tensor with at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`dim` must be an int, got {type(dim).__name__}")
    if not -reward.dim() <= dim < reward.dim():
        raise IndexError(f"`dim` is {dim} but `{nm['reward']}` has {reward.dim()} dimension(s)")
    d = dim % reward.dim()
    tensors = {"reward": reward}
    for key, t in (("value", value), ("next_value", next_value), ("log_pi", log_pi), ("log_mu", log_mu)):
        if t is not None:
            tensors[key] = _same_shape(nm.get(key, key), t, reward, nm["reward"])
    if value is None and (mode != TD_LAMBDA or next_value is None):
        raise ValueError(f"{_NAMES[mode]} needs `{nm['value']}`")
    if mode == VTRACE and (log_pi is None or log_mu is None):
        raise ValueError("V-trace needs `log_pi` and `log_mu`")
    if next_value is not None and bootstrap is not None:
        raise ValueError(f"give `bootstrap` or `{nm['next_value']}`, not both")
    dtype = reward.dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    done = _flags(nm.get("done", "done"), done, reward, nm["reward"])
    terminated = _flags(nm.get("terminated", "terminated"), terminated, reward, nm["reward"])
    g = _rate(nm["gamma"], gamma, reward, d, nm["reward"])
    lm = _rate(nm["lam"], lam, reward, d, nm["reward"]) if mode != VTRACE else 0.0
    if bootstrap is not None:
        bootstrap = _bootstrap(bootstrap, reward, d)
    rho_bar = _threshold("rho_thresh", rho_bar) if mode == VTRACE else 1.0
    c_bar = _threshold("c_thresh", c_bar) if mode == VTRACE else 1.0
    args = (mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second)
    if _fusable(tensors, g, lm, bootstrap):
        return _fused(*args)
    if _cuda_fusable(tensors, g, lm, bootstrap, d):
        return _fused_cuda(*args)
    return _composed(*args)


def _bootstrap(b, reward: torch.Tensor, d: int) -> torch.Tensor:
    row_shape = reward.shape[:d] + reward.shape[d + 1 :]
    if isinstance(b, numbers.Real) and not isinstance(b, bool):
        return torch.tensor(float(b), dtype=torch.float64, device=reward.device)
    if not isinstance(b, torch.Tensor) or not (
        b.is_floating_point() or b.dtype in (torch.int32, torch.int64)
    ):
        kind = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
        raise TypeError(f"`bootstrap` must be a number or a real tensor, got {kind}")
    if b.device != reward.device and b.dim() > 0:
        raise ValueError(f"`bootstrap` is on {b.device} but `rewards` is on {reward.device}")
    if b.dim() > len(row_shape) or any(
        s not in (1, t) for s, t in zip(reversed(b.shape), reversed(row_shape))
    ):
        raise ValueError(
            f"`bootstrap` of shape {tuple(b.shape)} does not broadcast to the shape of `rewards` without "
            f"the time dim, {tuple(row_shape)}"
        )
    return b.to(reward.device)


def _kernel_inputs(tensors: dict, g, lm, bootstrap, device: torch.device | None) -> bool:
    """Whether a fused kernel may take these inputs: plain tensors (no subclass) on the CPU (``device`` None) or on
    ``device``, no gradient needed, nothing being traced."""
    if torch.compiler.is_compiling() or _modes_active():
        return False
    grad = torch.is_grad_enabled()
    for t in (*tensors.values(), g, lm, bootstrap):
        if isinstance(t, torch.Tensor) and (
            type(t) is not torch.Tensor
            or not (t.is_cpu if device is None else t.device == device)
            or (grad and t.requires_grad)
        ):
            return False
    return True


def _fusable(tensors: dict, g, lm, bootstrap) -> bool:
    """The fused CPU kernel runs on plain CPU tensors when no gradient is needed and nothing is being traced."""
    return _native.cpu_available() and _kernel_inputs(tensors, g, lm, bootstrap, None)


# The CUDA kernel gives each sequence one thread, which walks its steps one after another; the composed route's scan
# splits a row over many threads. So few very long sequences go to the composed route. The limits are unmeasured
# guesses (written without a GPU): a thread's serial walk of 4096 steps, or 16384 sequences (about 128 threads on
# each of an H100's 132 SMs, enough to keep memory busy whatever the length).
_CUDA_MAX_SERIAL_STEPS = 4096
_CUDA_MIN_SEQUENCES = 16384


def _cuda_fusable(tensors: dict, g, lm, bootstrap, d: int) -> bool:
    """The CUDA kernel runs on plain CUDA tensors when no gradient is needed and nothing is being traced."""
    r = tensors["reward"]
    if (
        not r.is_cuda
        or not _native.cuda_available()
        or not _kernel_inputs(tensors, g, lm, bootstrap, r.device)
    ):
        return False
    outer, n, inner = _layout(r.shape, d)
    return n <= _CUDA_MAX_SERIAL_STEPS or outer * inner >= _CUDA_MIN_SEQUENCES


def _fused_cuda(mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second):
    """The CUDA kernel (csrc/cuda/rl.cu): one launch on the current stream, V-trace's ratios computed in it.

    Same buffers as ``_fused`` (on the device). With contiguous inputs of the result dtype, bool flags and number or
    per-row rates, the launch is the only kernel run; anything else adds the conversions and copies that make the
    buffers.
    """
    out1, out2, call = _kernel_call(
        mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second
    )
    if call is not None:
        args, _alive = call  # the buffers stay referenced until the launch is queued
        _native.cuda_rl(out1.device, *args)
    return out1, out2


def _layout(shape: torch.Size, d: int) -> tuple[int, int, int]:
    return math.prod(shape[:d]), shape[d], math.prod(shape[d + 1 :])


def _rate_buffer(v, shape: torch.Size, d: int, cd: torch.dtype):
    """(pointer owner, value, per_elem) for the kernel: a per-row float64 buffer, a per-element one, or a number."""
    if not isinstance(v, torch.Tensor):
        return None, v, False
    v = v.reshape((1,) * (len(shape) - v.dim()) + tuple(v.shape))
    if v.shape[d] == 1:
        return v.to(torch.float64).expand((*shape[:d], 1, *shape[d + 1 :])).contiguous(), 0.0, False
    return v.to(cd).expand(shape).contiguous(), 0.0, True


def _threads(mode: int, g, lm, numel: int) -> int:
    """Threads for the CPU kernel: ``torch.get_num_threads()`` (the kernel also keeps 2^16 elements per thread).

    On threads of the module's own (``_native._thread_pool() == "std"``), a call without a recursion (γλ = 0:
    TD(0)), one vectorised streaming loop at about 0.4 ns per step, gets a second thread only from about 2^20 steps
    per thread: starting one costs tens of µs. torch's OpenMP workers are already running: TD(0) at (256, 2048) on 2
    of them takes 0.20 ms against 0.33 ms on one (2-core Xeon)."""
    threads = torch.get_num_threads()
    if (
        mode != VTRACE
        and isinstance(g, float)
        and isinstance(lm, float)
        and g * lm == 0.0
        and _native._thread_pool() == "std"
    ):
        threads = max(1, min(threads, numel >> 20))
    return threads


def _plain(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a contiguous tensor of ``dtype`` with no pending negation (a view's lazy ``-x``): itself when it
    already is one (the usual case: each conversion is a dispatcher call even when it does nothing)."""
    if t.dtype == dtype and t.is_contiguous() and not t.is_neg():
        return t
    return t.to(dtype).resolve_neg().contiguous()


def _kernel_call(mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second):
    """The outputs and the kernel's arguments (raw addresses of contiguous buffers, sizes, rates), shared by the CPU
    and CUDA bindings: ``(out1, out2, (args, buffers))``, or ``(out1, out2, None)`` for an empty input. V-trace's
    ``log_pi`` and ``log_mu`` go to the kernels as they are: both form the importance ratios themselves."""
    r = tensors["reward"]
    shape, dev = r.shape, r.device
    outer, n, inner = _layout(shape, d)
    out1 = torch.empty(shape, dtype=dtype, device=dev)
    out2 = torch.empty(shape, dtype=dtype, device=dev) if second and "value" in tensors else None
    if r.numel() == 0:
        return out1, out2, None
    buf = {k: _plain(t, dtype) for k, t in tensors.items()}
    cd = compute_dtype(dtype)
    gbuf, gval, gper = _rate_buffer(g, shape, d, cd)
    lbuf, lval, lper = _rate_buffer(lm, shape, d, cd)
    flags = [
        None if f is None else f if f.shape == shape and f.is_contiguous() else f.expand(shape).contiguous()
        for f in (done, terminated)
    ]
    boot = None
    if bootstrap is not None:
        boot = bootstrap.to(torch.float64).expand(shape[:d] + shape[d + 1 :]).contiguous()
    p = _native._ptr
    args = [
        mode,
        p(buf["reward"]),
        p(buf.get("value")),
        p(buf.get("next_value")),
        p(buf.get("log_pi")),
        p(buf.get("log_mu")),
        p(out1),
        p(out2),
        _native.dtype_code(dtype),
        outer,
        n,
        inner,
        p(gbuf),
        gval,
        gper,
        p(lbuf),
        lval,
        lper,
        p(flags[0]),
        p(flags[1]),
        p(boot),
        rho_bar,
        c_bar,
    ]
    return out1, out2, (args, (buf, gbuf, lbuf, flags, boot))


def _fused(mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second):
    """The C++ CPU kernel, on up to ``_threads(...)`` threads."""
    out1, out2, call = _kernel_call(
        mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second
    )
    if call is not None:
        args, _alive = call
        _native.cpu_module().rl(*args, _threads(mode, g, lm, out1.numel()))
    return out1, out2


def _composed(mode, tensors, dtype, g, lm, done, terminated, bootstrap, d, rho_bar, c_bar, second):
    """The same estimators from torch ops and the differentiable scan (any device, every gradient)."""
    cd = compute_dtype(dtype)
    r = tensors["reward"].to(cd)
    shape, dev = r.shape, r.device
    n = shape[d]
    if r.numel() == 0:
        empty = torch.empty(shape, dtype=dtype, device=dev)
        return empty, empty.clone() if second and "value" in tensors else None
    v = tensors["value"].to(cd) if "value" in tensors else None
    zero = torch.zeros((), dtype=cd, device=dev)
    if "next_value" in tensors:
        nv = tensors["next_value"].to(cd)
    else:
        last = zero if bootstrap is None else bootstrap.to(cd)
        last = last.expand(shape[:d] + shape[d + 1 :]).unsqueeze(d)
        nv = torch.cat([v.narrow(d, 1, n - 1), last], d)
    g = g.to(cd) if isinstance(g, torch.Tensor) else torch.tensor(g, dtype=cd, device=dev)
    pos = torch.arange(n, device=dev).reshape((n,) + (1,) * (len(shape) - d - 1))
    end = (pos == n - 1).expand(shape)
    for f in (done, terminated):
        if f is not None:
            end = end | f
    term = torch.zeros((), dtype=torch.bool, device=dev) if terminated is None else terminated
    b = torch.where(term, zero, g * nv)
    if mode == VTRACE:
        rho = (tensors["log_pi"].to(cd) - tensors["log_mu"].to(cd)).exp()
        pc, cc = rho.clamp_max(rho_bar), rho.clamp_max(c_bar)
        x = pc * (r + b - v)
        y = discounted_cumsum(x, (g * cc).expand(shape), dim=d, reverse=True, dones=end)
        vs = y + v
        vs_next = torch.where(end, nv, torch.cat([vs.narrow(d, 1, n - 1), vs.narrow(d, 0, 1)], d))
        adv = pc * (r + torch.where(term, zero, g * vs_next) - v)
        return vs.to(dtype), adv.to(dtype) if second else None
    lm = lm.to(cd) if isinstance(lm, torch.Tensor) else torch.tensor(lm, dtype=cd, device=dev)
    if mode == GAE:
        x = r + b - v
    else:
        x = r + torch.where(end, b, (1 - lm) * b)
    y = discounted_cumsum(x, (g * lm).expand(shape), dim=d, reverse=True, dones=end)
    if not second or v is None:
        return y.to(dtype), None
    return y.to(dtype), (y + v if mode == GAE else y - v).to(dtype)
