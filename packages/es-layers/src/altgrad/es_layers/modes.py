"""Noise structures: what member ``k``'s weight perturbation ``E_k`` is, and the update ``Σ_k w_k E_k``.

The weight has shape ``(m, n, *kernel)`` (``m`` outputs, ``n`` inputs per group). With ``σ`` the noise scale:

* **IID** (``mode="iid"``): every entry of ``E_k`` is an independent ``N(0, σ²)``. Stored: ``N·|W|``.
* **Sparse** (``mode="sparse"``, Linear): ``E_k`` is zero except ``s`` distinct random input columns, whose entries
  are ``N(0, σ²·n/s)`` (same expected norm as IID). Update: a scatter-add of ``N·m·s`` values.
* **Permuted** (``mode="permuted"``): one shared ``E`` of shape ``(m_sp, n_sp, *kernel)``, entries
  ``N(0, σ²·m·n/(m_sp·n_sp))``; member ``k`` draws random injections ``π_k: [n_sp] → [n]`` (input side) and/or
  ``ρ_k: [m_sp] → [m]`` (output side) and ``E_k[ρ_k(i), π_k(j)] = E[i, j]``, zero elsewhere. Update (one side):
  ``E · P`` with ``P = Σ_k w_k Π_k`` built by a scatter-add, then one GEMM; both sides: a scatter-add of
  ``N·m_sp·n_sp`` values.
* **Sign flip / Flipout** (``mode="flipout"``): one shared ``E`` (entries ``N(0, σ²)``); member ``k`` draws
  Rademacher vectors ``s_k`` (inputs) and/or ``r_k`` (outputs); ``E_k = diag(r_k) · E · diag(s_k)``, i.e.
  ``E ∘ (r_k s_kᵀ)``. Update: ``E ∘ (Σ_k w_k r_k s_kᵀ)``, one ``(m×N)·(N×n)`` GEMM (linear in ``w``: NESgpu's
  two-sided update used ``w²``).
* **Low rank** (``mode="lowrank"``, EGGROLL): ``E_k = σ/√r · A_k B_kᵀ`` with ``A_k`` (``m×r``) and ``B_k``
  (``n·|kernel| × r``) standard normal; each entry has variance ``σ²``. Update: one
  ``(m × N·r)·(N·r × n·|kernel|)`` GEMM.

Bias perturbations ``ε_k`` are IID ``N(0, σ²)`` per member in every mode. Everything is regenerated from
``(seed, step, layer_index, member)``; a layer stores only what its forward needs for the members it evaluates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as EF
from . import noise as _noise
from .base import STREAM_A, STREAM_B, STREAM_IN, STREAM_OUT, STREAM_SHARED, STREAM_WEIGHT, Perturbed

__all__ = ["FlipoutNoise", "IIDNoise", "LowRankNoise", "PermutedNoise", "SparseNoise"]


def _random_subsets(layer: Perturbed, size: int, count: int, stream: int, members: Tensor) -> Tensor:
    """``count`` distinct indices out of ``range(size)`` per member, in random order: ``(n, count)`` int64.

    Keys are unique (hash * size + column), so the result never depends on how ties are broken.
    """
    bits = _noise.sample_bits(size, **layer._key(stream), members=members, device=layer.weight.device)
    keys = bits.mul_(size).add_(torch.arange(size, device=bits.device))
    if count == size:
        return torch.argsort(keys, dim=1)
    return torch.topk(keys, count, dim=1, largest=False, sorted=True).indices


class IIDNoise(Perturbed):
    """Independent Gaussian ``E_k`` for every member (NESgpu's ``Perturbed``)."""

    mode = "iid"

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        e = self._normal(tuple(self.weight.shape), STREAM_WEIGHT, members).mul_(self._sigma)
        return {"weight": e}

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        return noise["weight"]

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return EF.perturbed_weighted_sum(w, noise["weight"])


class SparseNoise(Perturbed):
    """``E_k`` with ``sparsity`` non-zero input columns per member (NESgpu's ``SparsePerturbed``, with an update)."""

    mode = "sparse"
    sparsity: int

    def _init_sparse(self, sparsity: int | str) -> None:
        n = self.weight.shape[1]
        if sparsity == "auto":
            sparsity = max(1, n // self.directions)
        if isinstance(sparsity, bool) or not isinstance(sparsity, int):
            raise TypeError(f"sparsity must be a positive int or 'auto', got {sparsity!r}")
        if not 1 <= sparsity <= n:
            raise ValueError(f"sparsity must be in [1, in_features={n}], got {sparsity}")
        self.sparsity = sparsity

    def _per_member_elements(self) -> int:
        return self.weight.shape[0] * self.sparsity + self.weight.shape[1]

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        m, n = self.weight.shape
        cols = _random_subsets(self, n, self.sparsity, STREAM_IN, members)
        scale = self._sigma * math.sqrt(n / self.sparsity)
        vals = self._normal((m, self.sparsity), STREAM_WEIGHT, members).mul_(scale)
        return {"cols": cols, "values": vals}

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        return EF.sparse_dense(noise["cols"], noise["values"], self.weight.shape[1])

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return EF.sparse_weighted_sum(w, noise["cols"], noise["values"], self.weight.shape[1])


def _resolve_side(name: str, value: int | float, full: int) -> int:
    """NESgpu's sparsity argument: 0 = all, a float = that fraction kept, an int = that many kept."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an int or a float, got {type(value).__name__}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} as a fraction must be in [0, 1], got {value}")
        kept = int(value * full)
        if value > 0 and kept == 0:
            kept = 1
    else:
        kept = value
    if kept == 0:
        return full
    if not 1 <= kept <= full:
        raise ValueError(f"{name} must keep between 1 and {full} entries, got {value}")
    return kept


def _resolve_auto(kind: str, value: str, n_in: int, n_out: int) -> tuple[bool, bool]:
    if value == "auto":
        if 1 < n_in < 32 and 1 < n_out < 32:
            value = "both"
        elif n_in > n_out:
            value = "in"
        else:
            value = "out"
    if value not in ("in", "out", "both"):
        raise ValueError(f"{kind} must be 'auto', 'in', 'out' or 'both', got {value!r}")
    return value in ("in", "both"), value in ("out", "both")


class PermutedNoise(Perturbed):
    """One shared ``E``, permuted (optionally sparsely) per member (NESgpu's ``Permuted``)."""

    mode = "permuted"
    permute_inputs: bool
    permute_outputs: bool
    in_sparsity: int
    out_sparsity: int

    def _init_permuted(self, permutation: str, in_sparsity: int | float, out_sparsity: int | float) -> None:
        m, n = self.weight.shape[:2]
        if getattr(self, "groups", 1) != 1:
            raise ValueError(
                "permuted noise needs groups=1 (use mode='flipout' or 'iid' for grouped convolutions)"
            )
        self.in_sparsity = _resolve_side("in_sparsity", in_sparsity, n)
        self.out_sparsity = _resolve_side("out_sparsity", out_sparsity, m)
        sparse_in, sparse_out = self.in_sparsity < n, self.out_sparsity < m
        if permutation == "auto" and (sparse_in or sparse_out):
            # "auto" permutes the sparse side(s) only (NESgpu would add its size rule on top)
            self.permute_inputs, self.permute_outputs = sparse_in, sparse_out
        else:
            self.permute_inputs, self.permute_outputs = _resolve_auto("permutation", permutation, n, m)
        self.permute_inputs |= sparse_in
        self.permute_outputs |= sparse_out
        self.permutation = (
            "both" if self.permute_inputs and self.permute_outputs else "in" if self.permute_inputs else "out"
        )

    def _per_member_elements(self) -> int:
        if self.permute_inputs and self.permute_outputs:  # the update scatters m_sp * n_sp values per member
            kernel = max(1, math.prod(self.weight.shape[2:]))
            return 2 * self.out_sparsity * self.in_sparsity * kernel
        return self.weight.shape[0] + self.weight.shape[1]

    def _shared_noise(self) -> dict[str, Tensor]:
        m, n = self.weight.shape[:2]
        kernel = tuple(self.weight.shape[2:])
        kept = self.out_sparsity * self.in_sparsity
        rescale = math.sqrt(m * n / kept) if kept else 1.0  # an empty weight has no entries to rescale
        e = self._normal((self.out_sparsity, self.in_sparsity, *kernel), STREAM_SHARED, [0])[0]
        return {"shared_weight": e.mul_(self._sigma * rescale)}

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        m, n = self.weight.shape[:2]
        out: dict[str, Tensor] = {}
        if self.permute_inputs:
            out["in_idx"] = _random_subsets(self, n, self.in_sparsity, STREAM_IN, members)
        if self.permute_outputs:
            idx = _random_subsets(self, m, self.out_sparsity, STREAM_OUT, members)
            out["out_idx"] = idx
            # output row o of member k reads row out_inv[k, o] of the (zero-padded) shared product
            out["out_inv"] = EF.inverse_injection(idx, m)
        return out

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        return EF.permuted_dense(
            noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"), tuple(self.weight.shape)
        )

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return EF.permuted_weighted_sum(
            w, noise["shared_weight"], noise.get("in_idx"), noise.get("out_idx"), tuple(self.weight.shape)
        )


class FlipoutNoise(Perturbed):
    """One shared ``E`` with per-member random sign flips of inputs and/or outputs (Flipout; NESgpu ``Synthetic``)."""

    mode = "flipout"
    flip_inputs: bool
    flip_outputs: bool

    def _init_flipout(self, flip: str, in_sparsity: int | float = 0, out_sparsity: int | float = 0) -> None:
        for name, value in (("in_sparsity", in_sparsity), ("out_sparsity", out_sparsity)):
            if value:
                raise ValueError(
                    f"{name} must be 0 for sign-flip (Flipout) layers, got {value!r}; use a permuted layer for "
                    "sparse perturbations (NESgpu refuses it as well)"
                )
        m, n_per_group = self.weight.shape[:2]
        n = n_per_group * getattr(self, "groups", 1)
        self.flip_inputs, self.flip_outputs = _resolve_auto("flip", flip, n, m)
        self.flip = "both" if self.flip_inputs and self.flip_outputs else "in" if self.flip_inputs else "out"

    def _in_size(self) -> int:
        return self.weight.shape[1] * getattr(self, "groups", 1)

    def _per_member_elements(self) -> int:
        return self.weight.shape[0] + self._in_size()

    def _shared_noise(self) -> dict[str, Tensor]:
        e = self._normal(tuple(self.weight.shape), STREAM_SHARED, [0])[0]
        return {"shared_weight": e.mul_(self._sigma)}

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        dev, dt = self.weight.device, self.weight.dtype
        if self.flip_inputs:
            key = self._key(STREAM_IN)
            out["in_sign"] = _noise.sample_rademacher(
                self._in_size(), **key, members=members, device=dev, dtype=dt
            )
        if self.flip_outputs:
            key = self._key(STREAM_OUT)
            m = self.weight.shape[0]
            out["out_sign"] = _noise.sample_rademacher(m, **key, members=members, device=dev, dtype=dt)
        return out

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        return EF.flipout_dense(
            noise["shared_weight"],
            noise.get("in_sign"),
            noise.get("out_sign"),
            groups=getattr(self, "groups", 1),
        )

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return EF.flipout_weighted_sum(
            w,
            noise["shared_weight"],
            noise.get("in_sign"),
            noise.get("out_sign"),
            groups=getattr(self, "groups", 1),
        )


class LowRankNoise(Perturbed):
    """Rank-``r`` perturbations ``E_k = σ/√r · A_k B_kᵀ`` regenerated per member (EGGROLL)."""

    mode = "lowrank"
    rank: int

    def _init_lowrank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be a positive int, got {type(rank).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank}")
        if getattr(self, "groups", 1) != 1:
            raise ValueError(
                "low-rank noise needs groups=1 (use mode='flipout' or 'iid' for grouped convolutions)"
            )
        self.rank = rank

    def _fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])

    def _per_member_elements(self) -> int:
        return self.rank * (self.weight.shape[0] + self._fan_in())

    def _member_noise(self, members: Tensor) -> dict[str, Tensor]:
        m = self.weight.shape[0]
        a = self._normal((m, self.rank), STREAM_A, members).mul_(self._sigma / math.sqrt(self.rank))
        b = self._normal((self._fan_in(), self.rank), STREAM_B, members)
        return {"A": a, "B": b}

    def _dense_weight(self, noise: dict[str, Tensor]) -> Tensor:
        return EF.lowrank_dense(noise["A"], noise["B"], tuple(self.weight.shape))

    def _weighted_sum(self, w: Tensor, noise: dict[str, Tensor]) -> Tensor:
        return EF.lowrank_weighted_sum(w, noise["A"], noise["B"], tuple(self.weight.shape))
