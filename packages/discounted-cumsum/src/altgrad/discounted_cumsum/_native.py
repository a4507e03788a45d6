"""Bridge to the compiled kernels: turns tensors into the raw pointers and sizes the C++/CUDA code takes."""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch

from ._args import compute_dtype

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as exc:  # keep the reason: it is reported when the module is needed
        return None, f"{type(exc).__name__}: {exc}"


_cpu, _cpu_error = _load("_C")
_cuda, _cuda_error = _load("_C_cuda")


def cpu_available() -> bool:
    """Whether the compiled CPU module could be imported."""
    return _cpu is not None


def cuda_available() -> bool:
    """Whether the compiled CUDA module could be imported (a GPU is not required for this)."""
    return _cuda is not None


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels in use: ``"avx512"``, ``"avx2"`` or ``"baseline"``.

    The best one this CPU supports, unless the environment variable ``ALTGRAD_CPU_ISA`` (read at the first call)
    names one. ``None`` if the compiled CPU module is missing.

    Raises:
        RuntimeError: If ``ALTGRAD_CPU_ISA`` names an instruction set that is unknown, not compiled in or not
            supported by this CPU.
    """
    return _cpu.isa() if _cpu is not None else None


def supported_cpu_isas() -> list[str]:
    """The instruction sets ``ALTGRAD_CPU_ISA`` may name on this machine (compiled in and supported), best first."""
    return _cpu.supported_isas().split(", ") if _cpu is not None else []


@functools.cache
def _thread_pool() -> str:
    """Where the CPU kernels run a call's parts: ``"openmp"``, torch's own (GNU) OpenMP workers, found among the
    loaded libraries at the first parallel call; or ``"std"``, threads of the module's own (another OpenMP runtime,
    not Linux, or ``ALTGRAD_CPU_THREADS=std`` in the environment). Fixed for the process once looked up.

    Raises:
        RuntimeError: If ``ALTGRAD_CPU_THREADS`` is not ``std`` or ``openmp``, or is ``openmp`` where torch's GNU
            OpenMP runtime is not loaded.
    """
    return _require(_cpu, _cpu_error, "cpu").thread_pool()


def _set_chunk_tuning(min_chunked_row: int, min_elements_per_thread: int) -> tuple[int, int]:
    """Test hook: thresholds of the CPU kernel's chunked long-row path; returns the previous values.

    The defaults (rows of at least 2^18 steps, cut into chunks of min_chunked_row / 8 steps whatever the thread
    count; 2^16 elements per thread) are what makes threading pay; tests lower them so that short rows exercise
    many chunks and their carries.
    """
    return tuple(_require(_cpu, _cpu_error, "cpu")._set_tuning(min_chunked_row, min_elements_per_thread))


def cpu_module() -> ModuleType:
    """The compiled CPU module.

    Raises:
        RuntimeError: If it could not be imported (the reason is in the message).
    """
    return _require(_cpu, _cpu_error, "cpu")


def cuda_rl(device: torch.device, *args) -> None:
    """Launches the fused RL estimator kernel (csrc/cuda/rl.cu, binding ``rl``) on ``device``'s current stream.

    ``args`` are the binding's arguments but the stream (raw device addresses, sizes, rates; see
    csrc/cuda/module.cpp). The buffers must stay alive until the kernel has run: tensors allocated on the current
    stream are, as the caching allocator reuses their memory only for work queued after it on that stream.

    Raises:
        RuntimeError: If the CUDA module is missing or the launch fails.
    """
    mod = _require(_cuda, _cuda_error, "cuda")
    with torch.cuda.device(device):
        mod.rl(*args, torch.cuda.current_stream(device).cuda_stream)


def dtype_code(dtype: torch.dtype) -> int:
    """The kernels' code for a floating dtype (see csrc/cpu/problem.h, DType)."""
    return _DTYPE_CODES[dtype]


def _require(module: ModuleType | None, error: str | None, device: str) -> ModuleType:
    if module is None:
        hint = (
            " It is built only when nvcc is found at install time; reinstall with ALTGRAD_CUDA=1 "
            "(see the building docs), or move the tensors to the CPU."
            if device == "cuda"
            else " Reinstall altgrad-discounted-cumsum from a wheel or with a C++17 compiler available."
        )
        raise RuntimeError(
            f"altgrad.discounted_cumsum: the native {device} module is not available ({error}).{hint}"
        )
    return module


def _prepare(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    gamma_value: float,
    dones: torch.Tensor | None,
    initial: torch.Tensor | None,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor | None, bool, torch.Tensor | None, torch.Tensor | None, int, int, int]:
    """Makes every buffer contiguous in the [outer, n, inner] layout the kernels expect."""
    # Lazily negated or conjugated views (z.conj().imag, neg-bit tensors) keep their sign in a flag, not in
    # memory: resolve it before the kernels read raw memory.
    x = x.resolve_conj().resolve_neg()
    gamma, initial = _plain(gamma), _plain(initial)
    shape = x.shape
    outer = math.prod(shape[:dim])
    n = shape[dim]
    inner = math.prod(shape[dim + 1 :])
    xc = x.contiguous()
    # Gates that are constant along the scan and initial values are passed in float64 (they are small), so a
    # discount such as 0.99 is not rounded to float32; per-element gates use the compute dtype.
    # A Python-number discount is passed by value (gate None), which keeps a CUDA call to a single launch.
    gate, per_elem = None, False
    if gamma is not None:
        g = gamma.reshape((1,) * (len(shape) - gamma.dim()) + tuple(gamma.shape))
        per_elem = g.shape[dim] != 1
        if per_elem:
            gate = g.to(compute_dtype(x.dtype)).expand(shape).contiguous()
        else:
            gate = g.to(torch.float64).expand((*shape[:dim], 1, *shape[dim + 1 :])).contiguous()
    done = None if dones is None else dones.expand(shape).contiguous()
    init = None
    if initial is not None:
        init = initial.to(torch.float64).expand(shape[:dim] + shape[dim + 1 :]).contiguous()
    return xc, gate, per_elem, done, init, outer, n, inner


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` with its lazy conjugate/negative bits applied to memory (no copy when it has none)."""
    return None if t is None else t.resolve_conj().resolve_neg()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def native_scan(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    gamma_value: float,
    dones: torch.Tensor | None,
    initial: torch.Tensor | None,
    dim: int,
    reverse: bool,
) -> torch.Tensor:
    """Runs the compiled kernel for ``x.device`` (CPU or CUDA) on normalised arguments.

    Args:
        x: Input, float16/bfloat16/float32/float64 on the CPU or a CUDA device.
        gamma: Discount tensor broadcastable to ``x``, or ``None`` to use ``gamma_value``.
        gamma_value: Discount used when ``gamma`` is ``None``.
        dones: Bool resets broadcastable to ``x``, or ``None``.
        initial: Value before the first element in scan order (shape of ``x`` without ``dim``), or ``None``.
        dim: Non-negative scan dimension.
        reverse: Scan from the end.

    Returns:
        A new contiguous tensor with the result.

    Raises:
        RuntimeError: If the native module for the device is missing or a CUDA launch fails.
    """
    if x.numel() == 0:  # before _prepare: broadcasting gamma/initial to a (2^28, 0) input would allocate GBs
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xc, gate, per_elem, done, init, outer, n, inner = _prepare(x, gamma, gamma_value, dones, initial, dim)
    y = torch.empty_like(xc)
    # Arguments shared by the CPU and CUDA entry points; each appends its own execution context.
    args = (
        _ptr(xc),
        _ptr(y),
        _DTYPE_CODES[x.dtype],
        outer,
        n,
        inner,
        _ptr(gate),
        gamma_value,
        per_elem,
        _ptr(done),
        _ptr(init),
        reverse,
    )
    if x.device.type == "cpu":
        _require(_cpu, _cpu_error, "cpu").scan(*args, torch.get_num_threads())
        return y
    mod = _require(_cuda, _cuda_error, "cuda")
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        tiles = mod.tiles_needed(outer, n, inner)
        workspace = _cuda_workspace(mod, x.device, stream, tiles)
        mod.scan(
            *args,
            stream,
            _ptr(workspace),
            0 if workspace is None else _workspace_tiles[(x.device, stream)],
        )
    return y


# The single-pass CUDA kernel chains its tiles through a small workspace (ticket counter, epoch, per-tile flags).
# The kernel leaves it ready for the next launch, so it is allocated (zeroed) once per device and stream and only
# re-allocated when a larger input needs more tiles.
_workspaces: dict[tuple[torch.device, int], torch.Tensor] = {}
_workspace_tiles: dict[tuple[torch.device, int], int] = {}


def _cuda_workspace(mod: ModuleType, device: torch.device, stream: int, tiles: int) -> torch.Tensor | None:
    if tiles == 0:
        return None
    key = (device, stream)
    if _workspace_tiles.get(key, 0) < tiles:
        capacity = max(tiles, 2 * _workspace_tiles.get(key, 0), 64)
        _workspaces[key] = torch.zeros(mod.workspace_bytes(capacity), dtype=torch.uint8, device=device)
        _workspace_tiles[key] = capacity
    return _workspaces[key]
