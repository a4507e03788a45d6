"""The math of every perturbation mode, as small pure functions (one home for each mode).

The perturbed layers (:mod:`altgrad.es_layers.linear`, :mod:`altgrad.es_layers.conv`) and the noise structures
(:mod:`altgrad.es_layers.modes`) call these functions; other packages (``altgrad.zero_order``) can call them with
noise of their own. Nothing here draws random numbers: every function takes the per-member noise as tensors.

**Population layout.** ``n`` population members, ``R`` repeats. The batched input ``x`` has ``R * n`` rows and
**the member index varies fastest**: row ``i`` belongs to member ``i % n`` and repeat ``i // n``. Linear inputs are
``(R * n, *, in_features)`` (any number of middle dimensions), conv inputs ``(R * n, C_in, H, W)``. Every
per-member noise tensor has ``n`` as its first dimension.

**Perturbation.** Member ``k`` in repeat ``r`` computes the layer with weight ``W + c_r σ E_k`` and bias
``b + c_r σ ε_k``, where ``c_r = 1`` except with ``antithetic=True`` and an even ``R > 1``, where repeats
``R/2 ... R-1`` use ``c_r = -1`` (NESgpu's layout). ``σ`` is the ``sigma`` argument (``1.0`` when the noise already
includes the scale, as in the layers). ``ε_k`` is ``noise_b[k]`` (zero when ``noise_b`` is ``None``; it may be given
even when ``bias`` is ``None``).

``E_k`` per mode (``m`` outputs, ``n_in`` inputs, ``kernel`` the conv kernel dims):

| mode | ``E_k`` | noise arguments |
|---|---|---|
| perturbed | ``noise_w[k]`` (dense, IID) | ``noise_w (n, m, n_in, *kernel)`` |
| sparse (Linear only) | zero except columns ``cols[k]``: ``E_k[:, cols[k]] = values[k]`` | ``cols (n, s)`` int64, ``values (n, m, s)`` |
| permuted | ``E_k[ρ_k(i), π_k(j)] = shared[i, j]``, zero elsewhere (``π_k = in_idx[k]``, ``ρ_k = out_idx[k]``; a missing side is the identity) | ``shared (m_sp, n_sp, *kernel)``, ``in_idx (n, n_sp)``, ``out_idx (n, m_sp)`` int64, distinct entries per row |
| flipout | ``diag(out_sign[k]) · shared · diag(in_sign[k])`` (a missing side is all ones) | ``shared (m, n_in/groups, *kernel)``, ``in_sign (n, n_in)``, ``out_sign (n, m)`` |
| lowrank | ``a[k] @ b[k]ᵀ`` reshaped to the weight's shape | ``a (n, m, r)``, ``b (n, n_in·prod(kernel), r)`` |

Each mode has a forward (``<mode>_linear``, ``<mode>_conv2d``), the dense perturbations (``<mode>_dense``,
shape ``(n, *weight.shape)``, for checks) and the ES update ``Σ_k w_k σ E_k`` (``<mode>_weighted_sum``).
The forwards return ``F.linear(x, weight, bias)`` (or ``F.conv2d``) plus the perturbation term, without ever
materialising ``W + σE_k`` (except the IID mode, whose ``E_k`` is dense anyway).

The families live in one small module each: :mod:`~altgrad.es_layers.functional.iid` (``perturbed_*``),
:mod:`~altgrad.es_layers.functional.sparse`, :mod:`~altgrad.es_layers.functional.permuted`,
:mod:`~altgrad.es_layers.functional.flipout` and :mod:`~altgrad.es_layers.functional.lowrank`; the checks and the
population layout they share are in ``_common``; :mod:`~altgrad.es_layers.functional.embedding` holds the
embedding lookups of the families whose rows are cheap. This package re-exports every public name.
"""

from __future__ import annotations

from .embedding import flipout_embedding, lowrank_embedding, perturbed_embedding
from .flipout import flipout_conv2d, flipout_dense, flipout_linear, flipout_weighted_sum
from .iid import perturbed_affine, perturbed_conv2d, perturbed_dense, perturbed_linear, perturbed_weighted_sum
from .lowrank import lowrank_conv2d, lowrank_dense, lowrank_linear, lowrank_weighted_sum
from .permuted import (
    inverse_injection,
    permuted_conv2d,
    permuted_dense,
    permuted_linear,
    permuted_weighted_sum,
)
from .sparse import sparse_dense, sparse_linear, sparse_weighted_sum

__all__ = [
    "flipout_conv2d",
    "flipout_dense",
    "flipout_embedding",
    "flipout_linear",
    "flipout_weighted_sum",
    "inverse_injection",
    "lowrank_conv2d",
    "lowrank_dense",
    "lowrank_embedding",
    "lowrank_linear",
    "lowrank_weighted_sum",
    "permuted_conv2d",
    "permuted_dense",
    "permuted_linear",
    "permuted_weighted_sum",
    "perturbed_affine",
    "perturbed_conv2d",
    "perturbed_dense",
    "perturbed_embedding",
    "perturbed_linear",
    "perturbed_weighted_sum",
    "sparse_dense",
    "sparse_linear",
    "sparse_weighted_sum",
]
