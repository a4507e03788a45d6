"""Counter-based, stateless noise for populations of perturbations.

Every value is a pure function of ``(seed, step, layer, stream, member, position)``: nothing is stored and
torch's global random number generators are never read or advanced. The construction is

1. a 64-bit member key ``(a_k, b_k)`` derived by hashing ``seed``, ``step``, ``layer``, ``stream`` and the member
   index with a 32-bit avalanche hash (``lowbias32`` family, constants from Chris Wellons' hash prospector);
2. a per-element counter ``c`` mapped through the Weyl sequence ``c * a_k + b_k (mod 2**32)`` (``a_k`` odd, so
   two members' sequences only meet at isolated points) and the same avalanche hash;
3. uniforms from the top 24 bits (float32) or all 32 bits (float64) and the Box–Muller transform for normals,
   the top bit for Rademacher signs.

All integer arithmetic is done in int64 on values below ``2**32`` with multipliers below ``2**31``, so it never
overflows and is bit-identical on every device. The float transform uses torch's ``log``/``cos``/``sin``, so rows
are bit-reproducible on a given device type (CPU vs CUDA may differ in the last ulp). Work is processed in
cache-sized blocks, so memory traffic stays low on CPU.

Row ``k`` of the result depends only on ``(seed, step, layer, stream, members[k])`` and the requested shape, so a
shard of the population regenerates exactly the rows that the full population would get.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["Members", "member_tensor", "sample_bits", "sample_normal", "sample_rademacher", "sample_uniform"]

#: Member indices accepted by the samplers: a ``range``, a sequence of ints or a 1-D integer tensor.
Members = range | Sequence[int] | Tensor

_M32 = 0xFFFFFFFF
_C1 = 0x21F0AAAD  # both multipliers < 2**31: products of 32-bit values stay below 2**63
_C2 = 0x735A2D97
# Domain-separation constants (so that normal/uniform/sign streams of one key are independent).
_DOMAIN_NORMAL = 0x3C6EF372
_DOMAIN_SIGN = 0x5851F42D
_DOMAIN_UNIFORM = 0x14057B7E
_DOMAIN_BITS = 0x2545F491
_DOMAIN_B = 0x6A09E667
_DOMAIN_A = 0x1B873593
_BLOCK = 1 << 17  # elements per block (int64: 1 MiB), keeps the per-element passes in cache

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _mix32(x: int) -> int:
    """Python-int version of the avalanche hash (bit-identical to :func:`_mix32_`)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 15
    x = (x * _C2) & _M32
    x ^= x >> 15
    return x


def _mix32_(x: Tensor) -> Tensor:
    """In-place avalanche hash of an int64 tensor holding values in ``[0, 2**32)``."""
    x.bitwise_xor_(x >> 16)
    x.mul_(_C1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_C2).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15)
    return x


def _check_index(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import operator

            value = operator.index(value)  # type: ignore[arg-type]  # numpy ints, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _prefix_key(seed: int, step: int, layer: int, stream: int, domain: int) -> int:
    """Hash the scalar part of the key (everything except the member) into 32 bits."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import operator

            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    seed &= (1 << 64) - 1
    step = _check_index("step", step)
    layer = _check_index("layer", layer)
    stream = _check_index("stream", stream)
    h = _mix32(domain)
    for word in (seed, step, layer, stream):
        h = _mix32(h ^ (word & _M32))
        h = _mix32(h ^ ((word >> 32) & _M32) ^ 0x9E3779B9)
    return h


def member_tensor(members: Members, device: torch.device | str | None = None) -> Tensor:
    """Convert member indices to a 1-D int64 tensor, validating them.

    Args:
        members: A ``range``, a sequence of ints or a 1-D integer tensor of non-negative member indices.
        device: Device of the returned tensor (default: the tensor's own device, or CPU).

    Returns:
        A 1-D ``torch.int64`` tensor.

    Raises:
        TypeError: If ``members`` is not a range, a sequence of ints or an integer tensor.
        ValueError: If it is not 1-D or holds a negative index.
    """
    if isinstance(members, Tensor):
        if members.dtype.is_floating_point or members.dtype.is_complex or members.dtype == torch.bool:
            raise TypeError(f"members must be an integer tensor, got dtype {members.dtype}")
        t = members.to(device=device if device is not None else members.device, dtype=torch.int64)
    elif isinstance(members, range):
        t = torch.arange(members.start, members.stop, members.step, dtype=torch.int64, device=device)
    elif isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
        raise TypeError(
            f"members must be a range, a sequence of ints or a 1-D integer tensor, got {type(members).__name__}"
        )
    else:
        for m in members:
            if isinstance(m, bool) or not isinstance(m, int):
                try:
                    import operator

                    operator.index(m)
                except TypeError:
                    raise TypeError(f"members must hold ints, got {type(m).__name__}") from None
        t = torch.tensor([int(m) for m in members], dtype=torch.int64, device=device)
    if t.dim() != 1:
        raise ValueError(f"members must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError("members must be non-negative member indices")
    return t


def _member_keys(prefix: int, members: Tensor) -> tuple[Tensor, Tensor]:
    """Per-member Weyl multiplier ``a`` (odd, < 2**31) and offset ``b`` (< 2**32), shape ``(n, 1)``."""
    lo = members & _M32
    hi = (members >> 32) & _M32
    h = _mix32_(lo ^ prefix)
    h = _mix32_(h ^ hi ^ 0x85EBCA6B)
    a = _mix32_(h ^ _DOMAIN_A)
    a = (a >> 1) | 1
    b = _mix32_(h ^ _DOMAIN_B)
    return a.unsqueeze(1), b.unsqueeze(1)


def _parse(
    shape: int | Sequence[int],
    members: Members,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[tuple[int, ...], Tensor, torch.device, torch.dtype, int]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {type(shape).__name__}") from None
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"shape must hold ints, got {shape!r}")
        if s < 0:
            raise ValueError(f"shape must hold non-negative sizes, got {shape!r}")
    if dtype is None:
        dtype = torch.get_default_dtype()
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of float16, bfloat16, float32, float64, got {dtype}")
    if device is None:
        device = members.device if isinstance(members, Tensor) else torch.device("cpu")
    device = torch.device(device)
    m = member_tensor(members, device=device)
    numel = math.prod(shape)
    return shape, m, device, dtype, numel


def _hash_block(a: Tensor, b: Tensor, counters: Tensor) -> Tensor:
    """Hash of ``counters * a + b`` for every (member, counter) pair: shape ``(len(a), len(counters))``."""
    x = counters.unsqueeze(0) * a  # < 2**63 (counter < 2**32, a < 2**31)
    x.add_(b).bitwise_and_(_M32)
    return _mix32_(x)


def _blocks(n_rows: int, n_cols: int):
    """Yield (row_start, row_stop, col_start, col_stop) blocks of about ``_BLOCK`` elements."""
    if n_rows == 0 or n_cols == 0:
        return
    if n_cols >= _BLOCK:
        for r in range(n_rows):
            for c in range(0, n_cols, _BLOCK):
                yield r, r + 1, c, min(c + _BLOCK, n_cols)
    else:
        rows = max(1, _BLOCK // n_cols)
        for r in range(0, n_rows, rows):
            yield r, min(r + rows, n_rows), 0, n_cols


def sample_normal(
    shape: int | Sequence[int],
    *,
    seed: int,
    step: int = 0,
    layer: int = 0,
    members: Members,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stream: int = 0,
) -> Tensor:
    """Standard normal noise, one independent row per population member.

    Row ``k`` depends only on ``(seed, step, layer, stream, members[k])`` and ``shape``: any shard of the population
    regenerates exactly the rows of the full population. Torch's global RNG is never touched.

    Args:
        shape: Shape of one member's sample.
        seed: Base seed (any Python int; reduced modulo ``2**64``).
        step: Non-negative step (generation) counter.
        layer: Non-negative layer index, so that layers sharing a seed get independent noise.
        members: Member indices: a ``range``, a sequence of ints or a 1-D integer tensor.
        device: Output device (default: the device of ``members`` if it is a tensor, else CPU).
        dtype: float16, bfloat16, float32 or float64 (default: torch's default dtype). Half types are sampled in
            float32 and cast; float64 uses 32-bit uniforms and float64 arithmetic.
        stream: Non-negative sub-stream index, for several independent tensors of one layer (weight, bias, ...).

    Returns:
        Tensor of shape ``(len(members), *shape)``.

    Raises:
        TypeError: For a non-integer seed/step/layer/stream/member, or an unsupported dtype.
        ValueError: For negative indices or sizes.

    Example:
        >>> x = sample_normal((2, 3), seed=0, members=range(4))
        >>> x.shape
        torch.Size([4, 2, 3])
        >>> torch.equal(sample_normal((2, 3), seed=0, members=[2, 3]), x[2:])
        True
    """
    shape, m, device, dtype, numel = _parse(shape, members, device, dtype)
    prefix = _prefix_key(seed, step, layer, stream, _DOMAIN_NORMAL)
    n = m.numel()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    half = (numel + 1) // 2
    out = torch.empty((n, 2 * half), dtype=work, device=device)
    if n and half:
        a, b = _member_keys(prefix, m)
        col_counter = torch.arange(half, dtype=torch.int64, device=device)
        for r0, r1, c0, c1 in _blocks(n, half):
            cnt = col_counter[c0:c1]
            u1 = _to_uniform(_hash_block(a[r0:r1], b[r0:r1], cnt), work)
            u2 = _to_uniform(_hash_block(a[r0:r1], b[r0:r1], cnt + half), work)
            u1.log_().mul_(-2.0).sqrt_()  # radius
            u2.mul_(2.0 * math.pi)  # angle
            torch.mul(u1, torch.cos(u2), out=out[r0:r1, c0:c1])
            torch.mul(u1, u2.sin_(), out=out[r0:r1, half + c0 : half + c1])
    res = out[:, :numel] if numel != 2 * half else out
    res = res.reshape((n, *shape))
    return res if res.dtype == dtype else res.to(dtype)


def _to_uniform(x: Tensor, work: torch.dtype) -> Tensor:
    """Map 32-bit hashes to uniforms in the open interval (0, 1)."""
    if work == torch.float64:
        return x.to(torch.float64).add_(0.5).mul_(2.0**-32)
    return (x >> 8).to(torch.float32).add_(0.5).mul_(2.0**-24)


def sample_uniform(
    shape: int | Sequence[int],
    *,
    seed: int,
    step: int = 0,
    layer: int = 0,
    members: Members,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stream: int = 0,
) -> Tensor:
    """Uniform noise on the open interval (0, 1), one independent row per member.

    Same guarantees and arguments as :func:`sample_normal`.

    Args:
        shape: Shape of one member's sample.
        seed: Base seed.
        step: Non-negative step counter.
        layer: Non-negative layer index.
        members: Member indices: a ``range``, a sequence of ints or a 1-D integer tensor.
        device: Output device.
        dtype: float16, bfloat16, float32 or float64 (half types are sampled in float32 then cast).
        stream: Non-negative sub-stream index.

    Returns:
        Tensor of shape ``(len(members), *shape)``.
    """
    shape, m, device, dtype, numel = _parse(shape, members, device, dtype)
    prefix = _prefix_key(seed, step, layer, stream, _DOMAIN_UNIFORM)
    n = m.numel()
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty((n, numel), dtype=work, device=device)
    if n and numel:
        a, b = _member_keys(prefix, m)
        col_counter = torch.arange(numel, dtype=torch.int64, device=device)
        for r0, r1, c0, c1 in _blocks(n, numel):
            out[r0:r1, c0:c1] = _to_uniform(_hash_block(a[r0:r1], b[r0:r1], col_counter[c0:c1]), work)
    res = out.reshape((n, *shape))
    return res if res.dtype == dtype else res.to(dtype)


def sample_rademacher(
    shape: int | Sequence[int],
    *,
    seed: int,
    step: int = 0,
    layer: int = 0,
    members: Members,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stream: int = 0,
) -> Tensor:
    """Rademacher (±1 with equal probability) noise, one independent row per member.

    Same guarantees and arguments as :func:`sample_normal`; the sign stream is independent of the normal stream
    of the same key.

    Args:
        shape: Shape of one member's sample.
        seed: Base seed.
        step: Non-negative step counter.
        layer: Non-negative layer index.
        members: Member indices: a ``range``, a sequence of ints or a 1-D integer tensor.
        device: Output device.
        dtype: float16, bfloat16, float32 or float64 (default: torch's default dtype).
        stream: Non-negative sub-stream index.

    Returns:
        Tensor of shape ``(len(members), *shape)`` holding -1 and +1.

    Example:
        >>> s = sample_rademacher(5, seed=1, members=range(3))
        >>> sorted(s.unique().tolist())
        [-1.0, 1.0]
    """
    shape, m, device, dtype, numel = _parse(shape, members, device, dtype)
    prefix = _prefix_key(seed, step, layer, stream, _DOMAIN_SIGN)
    n = m.numel()
    out = torch.empty((n, numel), dtype=dtype, device=device)
    if n and numel:
        a, b = _member_keys(prefix, m)
        col_counter = torch.arange(numel, dtype=torch.int64, device=device)
        for r0, r1, c0, c1 in _blocks(n, numel):
            bits = _hash_block(a[r0:r1], b[r0:r1], col_counter[c0:c1]) >> 31  # top bit: 0 or 1
            out[r0:r1, c0:c1] = bits.mul_(2).sub_(1)
    return out.reshape((n, *shape))


def sample_bits(
    shape: int | Sequence[int],
    *,
    seed: int,
    step: int = 0,
    layer: int = 0,
    members: Members,
    device: torch.device | str | None = None,
    stream: int = 0,
) -> Tensor:
    """Raw 32-bit random integers (as int64 in ``[0, 2**32)``), one independent row per member.

    The building block of the other samplers (used for random permutations and index subsets).
    Bit-identical on every device. Same arguments as :func:`sample_normal` (without ``dtype``).

    Args:
        shape: Shape of one member's sample.
        seed: Base seed.
        step: Non-negative step counter.
        layer: Non-negative layer index.
        members: Member indices: a ``range``, a sequence of ints or a 1-D integer tensor.
        device: Output device.
        stream: Non-negative sub-stream index.

    Returns:
        int64 tensor of shape ``(len(members), *shape)``.
    """
    shape, m, device, _, numel = _parse(shape, members, device, torch.float32)
    prefix = _prefix_key(seed, step, layer, stream, _DOMAIN_BITS)
    n = m.numel()
    out = torch.empty((n, numel), dtype=torch.int64, device=device)
    if n and numel:
        a, b = _member_keys(prefix, m)
        col_counter = torch.arange(numel, dtype=torch.int64, device=device)
        for r0, r1, c0, c1 in _blocks(n, numel):
            out[r0:r1, c0:c1] = _hash_block(a[r0:r1], b[r0:r1], col_counter[c0:c1])
    return out.reshape((n, *shape))
